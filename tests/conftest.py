"""Test setup: the Triton kernels run compiled on CUDA when a GPU is present, and otherwise in
Triton's interpreter on the CPU. The switch must be set before triton is first imported."""
import os
import sys

# The interpreter runs tl.dot through numpy: on a 2-core machine OpenBLAS's own threads only
# contend with each other (measured: the parity suite takes 47 s with them, 33 s without). Set
# before numpy is loaded.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import torch  # noqa: E402

if not torch.cuda.is_available():
    if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("triton was imported before tests/conftest.py could set TRITON_INTERPRET=1")
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402

import fusedres  # noqa: E402
from fusedres import kernels  # noqa: E402

#: Where the parity tests run: the compiled kernels on a GPU, else the interpreter on the CPU.
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture
def device() -> str:
    return DEVICE


@pytest.fixture
def launches():
    """Launch counter: ``launches()`` gives the kernel launches since the test began."""
    before = kernels.launch_counts()

    def since() -> dict[str, int]:
        now = kernels.launch_counts()
        return {k: now[k] - before.get(k, 0) for k in now if now[k] != before.get(k, 0)}

    return since


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    """Each test starts from the default dispatch, whatever the caller's shell has set, and
    leaves it so: fusedres reads FUSEDRES_BACKEND and FUSEDRES_VALIDATE once, at import, so a
    test changes them with fusedres.set_backend / fusedres.set_validate (reset here)."""
    monkeypatch.delenv("FUSEDRES_BACKEND", raising=False)
    monkeypatch.delenv("FUSEDRES_VALIDATE", raising=False)
    fusedres.set_backend(None)
    fusedres.set_validate(False)
    assert fusedres.backend_for(DEVICE) == "triton", "the parity suite must run the Triton kernels"
    yield
    fusedres.set_backend(None)
    fusedres.set_validate(False)


#: FUSEDRES_PIN_CONFIGS=1: every single-block launch takes one config per kernel and operand dtypes
#: (fusedres.kernels.configs.pin_configs) instead of autotuning among the shipped ones. For GPU runs:
#: a first run then compiles each kernel variant once instead of benchmarking every candidate.
PIN_CONFIGS = os.environ.get("FUSEDRES_PIN_CONFIGS", "0") == "1"


@pytest.fixture(autouse=True, scope="session")
def _pinned_configs():
    if not PIN_CONFIGS:
        yield
        return
    from fusedres.kernels import configs
    with configs.pin_configs():
        yield


def _instrument_support() -> tuple[bool, str]:
    if DEVICE != "cpu":
        return False, "no interpreter on a CUDA machine"
    from fusedres import traffic
    return traffic.supported()


_INSTRUMENT = _instrument_support()


def pytest_report_header(config):
    import triton
    state = "on" if _INSTRUMENT[0] and os.environ.get("FUSEDRES_SANITIZE", "1") != "0" else "OFF"
    why = "" if _INSTRUMENT[0] else f" ({_INSTRUMENT[1]})"
    return f"fusedres: torch {torch.__version__}, triton {triton.__version__}, device {DEVICE}, sanitizer {state}{why}"


def pytest_terminal_summary(terminalreporter):
    if DEVICE == "cpu" and not _INSTRUMENT[0]:
        terminalreporter.write_line(f"fusedres: the bounds sanitizer was OFF for this run: {_INSTRUMENT[1]}",
                                    yellow=True)


@pytest.fixture(autouse=True)
def _sanitized(request):
    """Every interpreted launch of every test runs under the bounds sanitizer (fusedres.traffic):
    an active lane outside its tensor's storage raises before it happens, one outside its view is
    recorded and fails the test. ``FUSEDRES_SANITIZE=0`` turns it off."""
    if DEVICE != "cpu" or os.environ.get("FUSEDRES_SANITIZE", "1") == "0" or "no_sanitizer" in request.keywords:
        yield
        return
    from fusedres.traffic import InterpreterTraffic
    if not _INSTRUMENT[0]:
        yield
        return

    with InterpreterTraffic(track_unique=False, raise_on_violation=True) as sanitizer:
        yield
    assert sanitizer.violations == [], "\n".join(map(str, sanitizer.violations))
