"""Shared by the PyTorch tests: a BN CNN trained on digits (once per session) and the agreement measure."""
import sys
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def trained():
    """(the trained net, 300 calibration images, the 360 held-out images), as tensors."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("sklearn")
    sys.path.insert(0, str(Path(__file__).parent.parent.parent / "fixtures"))
    import make_fixtures
    (x_train, y_train), (x_test, _) = make_fixtures.digits()
    torch.manual_seed(0)
    net = make_fixtures.train(make_fixtures.build_model(), x_train, y_train)
    return net, torch.from_numpy(x_train[:300]), torch.from_numpy(x_test)
