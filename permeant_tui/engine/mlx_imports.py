"""mlx-lm's run-time modules without `transformers` and `huggingface_hub` until a model needs them.

`import mlx_lm` runs its package `__init__`, which imports the converter, the generator and the
loader; `mlx_lm.generate`, `mlx_lm.utils` and `mlx_lm.tokenizer_utils` import `transformers`
and `huggingface_hub` at module level. Together that is the largest stage of a cold start
(about 1.2 s of a quiet machine's start-up, 4-5 s on a loaded one), and a GGUF model, the
embedded ones included, uses neither: its tokenizer is ours (engine/gguf_tokenizer.py) and the
names those modules take from `transformers` are base classes and type hints.

`install()` (called by `runtime.prepare()`, before anything imports mlx-lm) puts a finder in
front of the import system that:
- gives `mlx_lm` as a package whose `__init__` has not run (its submodules import as usual);
- runs those three modules with small stand-ins for the names they take from `transformers`
  and `huggingface_hub` in `sys.modules` for the duration of their own execution only.
The first time anything needs the real libraries (`from mlx_lm import load` for an MLX folder or
a Hub repo, `AutoTokenizer.from_pretrained`, `snapshot_download`, any other name of the
package), `complete()` imports them, puts the real names back into those modules, re-creates
mlx-lm's `NewlineTokenizer` on the real base class and registers it, and runs the package's
`__init__`: from then on everything is as if mlx-lm had been imported normally.
`PERMEANT_LAZY_TRANSFORMERS=0` turns this off.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import inspect
import os
import sys
import threading
import types
from typing import Any

PACKAGE = "mlx_lm"
STUBBED = ("mlx_lm.tokenizer_utils", "mlx_lm.utils", "mlx_lm.generate")
_lock = threading.RLock()
_completed = False
_installed = False


class _Stub:
    """Stands for a `transformers` class until the real library is imported."""

    permeant_stub = True


class PreTrainedTokenizerBase(_Stub):
    def apply_chat_template(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError


class PreTrainedTokenizer(PreTrainedTokenizerBase):
    pass


class PreTrainedTokenizerFast(PreTrainedTokenizerBase):
    pass


class AutoTokenizer(_Stub):
    @classmethod
    def register(cls, *args: Any, **kwargs: Any) -> None:
        pass  # NewlineTokenizer is registered with the real AutoTokenizer by complete()

    @classmethod
    def from_pretrained(cls, *args: Any, **kwargs: Any) -> Any:
        complete()
        import transformers

        return transformers.AutoTokenizer.from_pretrained(*args, **kwargs)


def snapshot_download(*args: Any, **kwargs: Any) -> Any:
    complete()
    import huggingface_hub

    return huggingface_hub.snapshot_download(*args, **kwargs)


def _stub_modules() -> dict[str, types.ModuleType]:
    tf = types.ModuleType("transformers")
    base = types.ModuleType("transformers.tokenization_utils_base")
    hub = types.ModuleType("huggingface_hub")
    for name in ("PreTrainedTokenizer", "PreTrainedTokenizerFast", "AutoTokenizer",
                 "PreTrainedTokenizerBase"):
        setattr(tf, name, globals()[name])
    base.PreTrainedTokenizerBase = PreTrainedTokenizerBase  # type: ignore[attr-defined]
    tf.tokenization_utils_base = base  # type: ignore[attr-defined]
    hub.snapshot_download = snapshot_download  # type: ignore[attr-defined]
    return {"transformers": tf, "transformers.tokenization_utils_base": base,
            "huggingface_hub": hub}


class _StubbedLoader(importlib.abc.Loader):
    """Runs one mlx-lm module with the stand-ins visible, unless the real ones are loaded."""

    def __init__(self, inner: importlib.abc.Loader) -> None:
        self.inner = inner

    def create_module(self, spec):
        return self.inner.create_module(spec)

    def get_source(self, fullname: str) -> str | None:  # tracebacks and inspect
        get = getattr(self.inner, "get_source", None)
        return get(fullname) if get else None

    def exec_module(self, module) -> None:
        with _lock:
            if _completed or "transformers" in sys.modules:
                self.inner.exec_module(module)
                return
            stubs = _stub_modules()
            saved = {k: sys.modules.get(k) for k in stubs}
            sys.modules.update(stubs)
            try:
                self.inner.exec_module(module)
            finally:
                for k, v in saved.items():
                    if v is None:
                        sys.modules.pop(k, None)
                    else:
                        sys.modules[k] = v


class _PackageLoader(importlib.abc.Loader):
    """`mlx_lm` without running its `__init__` (until `complete()`)."""

    def create_module(self, spec):
        return None  # the default module

    def exec_module(self, module) -> None:
        module.__getattr__ = _package_getattr  # type: ignore[attr-defined]


def _package_getattr(name: str) -> Any:
    if name.startswith("__"):
        raise AttributeError(name)
    complete()
    package = sys.modules[PACKAGE]
    try:
        return package.__dict__[name]
    except KeyError:
        raise AttributeError(f"module {PACKAGE!r} has no attribute {name!r}") from None


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path, target=None):
        if _completed or (fullname != PACKAGE and fullname not in STUBBED):
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None:
            return None
        if fullname == PACKAGE:
            spec.loader = _PackageLoader()
        else:
            spec.loader = _StubbedLoader(spec.loader)
        return spec


def install() -> bool:
    """Put the finder in place. False when mlx-lm is already imported or this is turned off."""
    global _installed
    with _lock:
        if _installed:
            return True
        if PACKAGE in sys.modules or os.environ.get("PERMEANT_LAZY_TRANSFORMERS") == "0":
            return False
        # What mlx-lm's __init__ sets first (it runs later, if ever).
        os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
        sys.meta_path.insert(0, _Finder())
        _installed = True
        return True


def complete() -> None:
    """Import the real `transformers` and `huggingface_hub` and make mlx-lm whole."""
    global _completed
    with _lock:
        if _completed:
            return
        _completed = True
        import huggingface_hub
        import transformers
        from transformers import tokenization_utils_base

        real = {"PreTrainedTokenizer": transformers.PreTrainedTokenizer,
                "PreTrainedTokenizerFast": transformers.PreTrainedTokenizerFast,
                "AutoTokenizer": transformers.AutoTokenizer,
                "PreTrainedTokenizerBase": tokenization_utils_base.PreTrainedTokenizerBase,
                "snapshot_download": huggingface_hub.snapshot_download}
        for name in STUBBED:
            module = sys.modules.get(name)
            if module is None:
                continue
            for attr, value in list(vars(module).items()):
                if value is globals().get(attr) and attr in real:
                    setattr(module, attr, real[attr])
        tu = sys.modules.get("mlx_lm.tokenizer_utils")
        old = getattr(tu, "NewlineTokenizer", None)
        if tu is not None and old is not None and issubclass(old, _Stub):
            exec(compile(inspect.getsource(old), tu.__file__ or "<mlx_lm>", "exec"), vars(tu))
            transformers.AutoTokenizer.register(tu.NewlineTokenizer,
                                                fast_tokenizer_class=tu.NewlineTokenizer)
        package = sys.modules.get(PACKAGE)
        if package is not None and "__getattr__" in vars(package):
            del package.__getattr__
            init = package.__spec__.origin if package.__spec__ else None
            if init:
                with open(init, encoding="utf-8") as f:
                    exec(compile(f.read(), init, "exec"), vars(package))


def state() -> str:
    """For doctor and the benchmarks."""
    if not _installed:
        return "imported normally"
    if _completed:
        return "imported on demand (a model needed them)"
    return "not imported (deferred until a model needs them)"
