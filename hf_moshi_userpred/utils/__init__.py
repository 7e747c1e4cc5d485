"""Small shared helpers: atomic files, CPU threads, error messages."""
