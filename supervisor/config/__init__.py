"""What was asked (pure): the config schema, loading it with its
placeholders, TLS files, and the reference made from the schema."""
