"""Fast CPU generation behind one streaming interface, whichever runtime serves it.

One module per job (import from the module; this file imports nothing, so loading one part stays light):

* `chat`: `ChatEngine` (template, context fitting, stops, streaming), `GenerationSettings`, `StreamEvent`;
* `backend_transformers`, `backend_llamacpp` (xllamacpp slots, llama-cpp-python), `backend_ctranslate2`:
  token-id backends that all take the same prompt ids and stop ids;
* `convert`: merged HF folders, CTranslate2 models and GGUF files, cached; `gguf_writer`: the
  pure-Python GGUF writer for Llama models;
* `match`: the greedy-match check against transformers fp32; `guard`: the held-out-NLL quality guard
  for quantised GGUFs;
* `choice`: `load_engine` (which engine serves a model, and why); `pool`: the app's engines, served at
  once on transformers and swapped for a faster one checked in the background.
"""
