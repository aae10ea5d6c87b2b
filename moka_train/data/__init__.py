"""Data: the ``Sample`` every dataset builder produces (DESIGN.md, "The data contract") and the collator that
renders, tokenizes and expands samples into the batch ``MultimodalLM`` consumes."""
