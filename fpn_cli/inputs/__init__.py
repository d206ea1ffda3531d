"""Finding inputs (files, folders, globs, lists, tars, URLs), their keys, decoding them."""
