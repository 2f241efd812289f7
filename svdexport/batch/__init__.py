"""`svdexport batch`: a prompt (or class) list sharded over Ray actors, resumable and lossless."""
