"""The demo: the package's whole recipe on the shipped sample (encode, train with the curriculum and the
voice-activity head, evaluate, stream with speculation, reload through remote code) and its report."""
