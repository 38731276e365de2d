"""One model per file, named after its paper."""
