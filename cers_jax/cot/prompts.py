"""Prompts that ask a vision LLM for a lesion's segmentation chain of thought (paper Sec. 3.1).

Every CoT has four parts, Texture, Boundary, Context and Summary, on their own lines.
``MASK_PROMPT`` goes with the image that has its ground-truth mask blended on in colour (the
labeled images, whose CoTs populate the knowledge pool); ``NO_MASK_PROMPT`` goes with the
plain image (unlabeled, validation and test images, whose CoTs must rest on what a model
could see at inference time).

The authors' released script pairs the two the other way round (the prompt that mentions
the mask is sent with the plain image); here the prompt that speaks of the highlighted
region is the one that comes with the overlay.
"""

import re

# The four parts, in the order they must appear.
SECTIONS = ('Texture', 'Boundary', 'Context', 'Summary')

_FORMAT = """Answer in exactly four lines, in plain text without markdown, in this form:
Texture: <one or two sentences on the lesion's internal intensity, heterogeneity and noise>
Boundary: <one or two sentences on how sharp, regular and well contrasted its margin is>
Context: <one or two sentences on nearby structures that look alike and could be confused with it>
Summary: <one sentence naming what makes this lesion hard or easy to segment>"""

MASK_PROMPT = (
    'You are an expert radiologist helping to train a lesion segmentation model. The '
    'medical image shows the ground-truth lesion region highlighted in {color}. Its report '
    'reads: "{report}"\n'
    'Look at the highlighted region and the tissue around it, and explain what a '
    'segmentation model must get right to outline exactly that region.\n' + _FORMAT)

NO_MASK_PROMPT = (
    'You are an expert radiologist helping to train a lesion segmentation model. The '
    'medical image is shown without any annotation. Its report reads: "{report}"\n'
    'Find the lesion the report describes, and explain what a segmentation model must get '
    'right to outline it.\n' + _FORMAT)

# A part counts as present when its name opens a line, allowing list marks or markdown
# emphasis the model might add anyway ("- **Texture:**").
_SECTION_RES = tuple(
    re.compile(rf'^[\s>*#-]*\**{name}\**\s*:', re.IGNORECASE | re.MULTILINE)
    for name in SECTIONS)


def build_prompt(report_text: str, *, with_mask: bool, color: str = 'red') -> str:
  """The mask prompt (overlay colour ``color``) or the no-mask prompt, filled with a report."""
  report = ' '.join(report_text.split()) or 'no report is available'
  if with_mask:
    return MASK_PROMPT.format(report=report, color=color)
  return NO_MASK_PROMPT.format(report=report)


def missing_sections(cot: str) -> list[str]:
  """The names of the four parts that ``cot`` lacks, in ``SECTIONS`` order."""
  return [name for name, pattern in zip(SECTIONS, _SECTION_RES)
          if not pattern.search(cot)]
