"""The model: configuration, modules, generation. These files are the remote code that `save_pretrained` copies
beside the weights, so they import only torch, transformers, the standard library and each other."""
