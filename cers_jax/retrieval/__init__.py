"""Knowledge pool, retrieval modes and the retrieval report."""
