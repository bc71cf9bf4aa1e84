"""Chain-of-thought generation through any OpenAI-compatible chat API (paper Sec. 3.1).

``prompts`` holds the mask / no-mask prompts, ``client`` a standard-library HTTP client with
retries, and ``generate`` the resumable CSV writer and its command line
(``python -m cers_jax.cot.generate --help``).
"""
