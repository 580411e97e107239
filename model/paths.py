"""Where the repository and the data beside it live: one home for every default path.

The data sets are not part of the repository: ``../shared`` beside the checkout holds Kodak (for
evaluation; never trained on), the training photos and the official LALIC reference results.
Tools and tests read them by default; the service never needs them.
"""

from __future__ import annotations

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
"""The checkout (the folder holding ``model/`` and ``service/``)."""
SHARED_DIR = REPO_ROOT.parent / "shared"
KODAK_DIR = SHARED_DIR / "datasets" / "kodak"
"""The 24 Kodak images (evaluation only)."""
TRAIN_DATA_DIR = SHARED_DIR / "datasets" / "train"
"""Training photos (research licences)."""
OFFICIAL_REFERENCE_DIR = SHARED_DIR / "reference" / "lalic-official"
"""The paper's rate-distortion points, VTM-9.1 and the official checkpoints' layout."""
