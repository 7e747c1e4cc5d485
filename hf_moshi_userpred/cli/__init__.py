"""The `hf-moshi-userpred` command line: the parser, and one module per command."""
