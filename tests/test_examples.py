"""The README shows examples/evaluate_checkpoint.py verbatim (test_end_to_end runs them all)."""

import os

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_readme_shows_the_example_as_it_is():
  with open(os.path.join(REPO, 'README.md'), encoding='utf-8') as f:
    readme = f.read()
  with open(os.path.join(REPO, 'examples', 'evaluate_checkpoint.py'), encoding='utf-8') as f:
    example = f.read()
  assert f'```python\n{example}```' in readme
