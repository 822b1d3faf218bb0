"""Data curation: archives to PraNet's layout (``prepare``), masks stretched by specks, near-duplicates."""
