"""``POST /v1/embeddings``: the request's inputs, the vectors' encodings and
Matryoshka truncation (see docs/embeddings.md). Engines compute the vectors
(:class:`gateway.contract.SupportsEmbeddings`); what is here is the same for
every engine."""
