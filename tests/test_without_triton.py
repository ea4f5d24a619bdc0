"""STYLE rule 6: with triton missing the package imports quietly, runs the reference path, and says what is missing."""

from __future__ import annotations

import subprocess
import sys

SCRIPT = """
import sys
import torch
for name in [n for n in sys.modules if n == "triton" or n.startswith("triton.")]:
    del sys.modules[name]

class HideTriton:
    def find_spec(self, name, path=None, target=None):
        if name == "triton" or name.startswith("triton."):
            raise ImportError("triton is hidden for this test")

sys.meta_path.insert(0, HideTriton())
import timm
import vitfast
from vitfast.ops import _triton

assert not _triton.HAS_TRITON
model = vitfast.create_model("eva02_tiny_patch14_224", depth=1, img_size=56, num_classes=3)
assert model(torch.randn(1, 3, 56, 56)).shape == (1, 3)
tower = vitfast.patch(timm.create_model("beitv2_base_patch16_224", depth=1, embed_dim=64, num_heads=1, img_size=64))
tower(torch.randn(1, 3, 64, 64)).sum().backward()
try:
    vitfast.set_backend("triton")
except RuntimeError as error:
    assert "needs the triton package" in str(error), error
else:
    raise AssertionError("set_backend('triton') without triton must raise")
print("ok")
"""


def test_package_works_without_triton() -> None:
    result = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"
    assert "Triton not available" not in result.stderr, "import should be quiet without triton"
