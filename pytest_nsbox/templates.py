"""``@template``: setup that runs once per cache key, its result an image every test boots.

::

    @template(image="debian.tar", inputs=["pyproject.toml", "src/"], network="bridge", nat=True)
    def app(box):
        box.copy_in("src", "/src")
        box.run("pip install /src", check=True)

    @pytest.mark.nsbox(image=app)
    def test_cli(nsbox): ...

The first box that asks for ``app`` starts a box with the decorator's options, runs the
function in it and snapshots it (``Box.snapshot``); the image is recorded in the layer cache's
index under a key made of

- the base image's identity (its layers' digests and config; the host's ``/`` by name),
- the function's source text,
- the content of the declared ``inputs`` (paths relative to the file that defines the
  function; ``__pycache__`` and ``*.pyc`` left out), and
- the decorator's box options.

An unchanged key, on the next run or the next day, finds the image without running the
function. The key does not cover what the function fetches from the network, globals it
reads, or files it was not told about: list them in ``inputs`` or use ``--nsbox-rebuild``.

Several pytest-xdist workers or sessions asking for the same template wait on one file lock:
one builds, the others find its image. The index entry is written only after the image is
whole, so a build killed midway leaves nothing a later run would use.

With a template cache (``--nsbox-template-cache docker://HOST/REPO``), a key missing from the
local cache is looked up in that registry repository (tag ``<name>-<key>``) before building,
and a build is pushed there: the shards of a CI run on many machines build each template once
in total, and a developer's machine pulls what CI built. A push that fails warns; the run goes on.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import threading
import time
import traceback
import uuid
import warnings
from collections.abc import Callable, Iterable
from typing import Any, overload

from . import registry_push, report
from .box import Box
from .errors import ArgumentTypeError, ConfigError, ImageError, NsboxError, TemplateError
from .image import Image, ImageConfig, load_image
from .layers import LayerStore
from .registry_http import RegistryError
from .spec import BoxSpec, ImageSource

__all__ = ["Template", "TemplateCacheWarning", "configure", "template"]


class TemplateCacheWarning(UserWarning):
    """A template could not be pushed to the template cache (the run goes on without it)."""


INDEX_PREFIX = "template:"
_KEY_VERSION = 1  # bump when the key's recipe changes: old entries then simply miss
_SKIPPED = ("__pycache__",)
_SKIPPED_SUFFIXES = (".pyc", ".pyo")

ReportLine = Callable[[str], None]


class _Settings:
    """What the session tells templates: the default base image, whether to rebuild, the run
    they belong to (so that ``--nsbox-rebuild`` rebuilds once per run, not once per worker),
    and where to say that a build is running."""

    def __init__(self) -> None:
        self.default_image: str | None = None
        self.rebuild = False
        self.run_id = uuid.uuid4().hex
        self.report: ReportLine | None = None
        self.template_cache: str | None = None


_settings = _Settings()


def configure(
    *,
    default_image: str | None = None,
    rebuild: bool = False,
    run_id: str | None = None,
    report_line: ReportLine | None = None,
    template_cache: str | None = None,
) -> None:
    """Set by the pytest plugin at the start of a session (``Box`` alone needs none of it).

    ``template_cache`` (``docker://HOST/REPO``) is a registry repository templates are shared
    through: looked up by key before a build, pushed to after one.
    """
    _settings.default_image = default_image
    _settings.rebuild = rebuild
    _settings.run_id = run_id or uuid.uuid4().hex
    _settings.report = report_line
    _settings.template_cache = template_cache


class Template(ImageSource):
    """A setup function and the options of the box it runs in; usable as ``image=``.

    ``resolve()`` returns the cached image for the current key, building it first if needed.
    """

    def __init__(
        self,
        function: Callable[[Box], Any],
        image: str | os.PathLike[str] | ImageSource | None,
        inputs: tuple[str, ...],
        options: dict[str, Any],
        name: str | None,
    ) -> None:
        self.function = function
        self.name = name or f"{function.__module__}.{function.__qualname__}"
        source_file = inspect.getsourcefile(function) or function.__code__.co_filename
        self.directory = os.path.dirname(os.path.abspath(source_file))
        self.inputs = inputs
        if isinstance(image, (str, os.PathLike)) and not os.path.isabs(image):
            beside = os.path.join(self.directory, image)
            if os.path.exists(beside):
                image = beside  # like inputs: relative to the file that defines the function
        # Checked now, at import time: a typo in the decorator fails the collection, not a test.
        self.spec = BoxSpec.create(f"@template({self.name})", image=image, **options)
        self.options = options
        self._lock = threading.Lock()
        self._built: dict[str, Image] = {}  # cache dir -> the image this process resolved
        self._failed: dict[str, TemplateError] = {}

    def __repr__(self) -> str:
        return f"<template {self.name}>"

    def __call__(self, box: Box) -> Any:
        """Run the setup function on ``box`` (what a build does; handy in a one-off test)."""
        return self.function(box)

    # ------------------------------------------------------------------------------ resolve

    def resolve(self, cache: str | None = None) -> Image:
        """The template's image in ``cache``: from this process's memory, the cache's index,
        or a build."""
        memo = cache or ""
        with self._lock:
            known = self._built.get(memo)
            if known is not None and all(map(os.path.isdir, known.lowers)):
                return known
            failed = self._failed.get(memo)
            if failed is not None:
                raise TemplateError(f"{failed} (it failed earlier in this run; not tried again)")
            try:
                image = self._resolve(cache)
            except TemplateError as exc:
                self._failed[memo] = exc
                raise
            self._built[memo] = image
            return image

    def _resolve(self, cache: str | None) -> Image:
        base_reference = self.spec.image if self.spec.image is not None else _settings.default_image
        base = load_image(base_reference, cache)
        key = self.key(base)
        store = LayerStore(cache)
        index_key = INDEX_PREFIX + key
        found = self._from_index(store, index_key)
        if found is not None:
            return found
        with store.lock("template-" + key[:24]):
            found = self._from_index(store, index_key)  # built by another worker meanwhile
            if found is not None:
                return found
            store.sweep_unfinished()  # what a build killed midway left
            shared = None if _settings.rebuild else self._from_registry(store, index_key, key)
            if shared is not None:
                return shared
            image = self._build(store, base, index_key, key)
            self._share(image, store, key)
            return image

    def _from_index(self, store: LayerStore, index_key: str) -> Image | None:
        entry = store.read_index(index_key)
        if entry is None:
            return None
        if _settings.rebuild and entry.get("run") != _settings.run_id:
            return None  # --nsbox-rebuild: built before this run, so build again
        image = _image_of(entry, store, self.name)
        if image is None:
            return None  # a layer was pruned since: build again
        store.touch_index(index_key)
        return image

    def remote_reference(self, key: str) -> str | None:
        """Where the template cache keeps this template for ``key`` (None: no template cache)."""
        if not _settings.template_cache:
            return None
        repository = _settings.template_cache.split("@")[0]
        if ":" in repository.split("/")[-1]:
            repository = repository.rsplit(":", 1)[0]  # a tag given with the repository: ours wins
        return f"{repository}:{_tag_name(self.name)[:40]}-{key}"

    def _from_registry(self, store: LayerStore, index_key: str, key: str) -> Image | None:
        remote = self.remote_reference(key)
        if remote is None:
            return None
        say = _settings.report
        try:
            pulled = load_image(remote, store.root)
        except ImageError as exc:
            if not (isinstance(exc, RegistryError) and exc.status == 404) and say is not None:
                say(f"template {self.name}: not taken from the template cache ({exc}); building")
            return None
        entry = {
            "kind": "template",
            "name": self.name,
            "source": f"template {self.name}",
            "pulled_from": remote,
            "layers": list(pulled.diff_ids),
            "base_dir": "",
            "snapshots": 1,
            "config": pulled.config.to_index(),
            "tags": [f"localhost/nsbox-template-{_tag_name(self.name)}:{key[:12]}"],
            "built": time.time(),
            "run": _settings.run_id,
            "own_layer": store.layer_path(pulled.diff_ids[-1]) if pulled.diff_ids else "",
        }
        store.write_index(index_key, entry)
        if say is not None:
            say(f"template {self.name}: pulled from {remote}")
        return _image_of(entry, store, self.name)

    def _share(self, image: Image, store: LayerStore, key: str) -> None:
        """Push a fresh build to the template cache; a failure warns and the run goes on."""
        remote = self.remote_reference(key)
        if remote is None:
            return
        say = _settings.report
        problem = None
        if image.base_dir:
            problem = f"it is built over the directory {image.base_dir}, which is this machine's alone"
        else:
            try:
                registry_push.push(image, remote, os.path.join(store.root, "tmp"))
            except Exception as exc:  # a push is a bonus: whatever goes wrong, the run goes on
                problem = (
                    str(exc) if isinstance(exc, (NsboxError, OSError)) else f"{type(exc).__name__}: {exc}"
                )
        if problem is None:
            if say is not None:
                say(f"template {self.name}: pushed to {remote}")
            return
        message = f"template {self.name}: not pushed to the template cache {remote}: {problem}"
        warnings.warn(message, TemplateCacheWarning, stacklevel=2)
        if say is not None:
            say(message)

    def _build(self, store: LayerStore, base: Image, index_key: str, key: str) -> Image:
        say = _settings.report
        if say is not None:
            say(f"template {self.name}: building (key {key[:12]}) ...")
        started = time.monotonic()
        spec = self.spec.merged(f"@template({self.name})", image=base, cache=store.root)
        box = Box(spec=spec)
        try:
            box.start()
            try:
                self.function(box)
            except Exception as exc:
                raise TemplateError(self._failure(exc, box)) from exc
            image = box.snapshot()
        finally:
            box.stop()
        seconds = time.monotonic() - started
        tag = f"localhost/nsbox-template-{_tag_name(self.name)}:{key[:12]}"
        own = store.layer_path(image.diff_ids[-1]) if image.diff_ids else ""
        entry = {
            "kind": "template",
            "name": self.name,
            "source": f"template {self.name}",
            "base": base.reference,
            "layers": list(image.diff_ids),
            "base_dir": image.base_dir,
            "snapshots": image.snapshots,
            "config": image.config.to_index(),
            "tags": [tag],
            "built": time.time(),
            "build_seconds": round(seconds, 3),
            "run": _settings.run_id,
            "own_layer": own,
        }
        store.write_index(index_key, entry)
        if say is not None:
            say(f"template {self.name}: built in {seconds:.1f}s")
        result = _image_of(store.read_index(index_key) or entry | {"key": index_key}, store, self.name)
        if result is None:  # pragma: no cover - the layers were just made
            raise TemplateError(f"template {self.name}: its layers vanished as it was built")
        return result

    def _failure(self, exc: BaseException, box: Box) -> str:
        trace = "".join(traceback.format_exception(exc)).rstrip()
        try:
            described = report.describe(box)
        except Exception as problem:  # the report must not hide the setup's own error
            described = f"(could not describe the box: {problem})"
        return (
            f"template {self.name}: its setup function raised {type(exc).__name__}: {exc}\n"
            f"{trace}\n--- the template's box ---\n{described}\n"
            "Nothing was cached; fix the function and run again."
        )

    # ---------------------------------------------------------------------------------- key

    def key(self, base: Image) -> str:
        """The cache key (hex) for a build over ``base``."""
        options = {name: _jsonable(value) for name, value in sorted(self.options.items())}
        recipe = {
            "version": _KEY_VERSION,
            "base": base.identity,
            "source": _source(self.function),
            "inputs": self._inputs_digest(),
            "options": options,
        }
        return hashlib.sha256(json.dumps(recipe, sort_keys=True, default=repr).encode()).hexdigest()

    def _inputs_digest(self) -> str:
        digest = hashlib.sha256()
        for given in self.inputs:
            path = given if os.path.isabs(given) else os.path.join(self.directory, given)
            if not os.path.lexists(path):
                raise ConfigError(
                    f"@template({self.name}): input {given!r} does not exist (looked for {path}; "
                    f"relative inputs are taken from {self.directory}, where the function is defined)"
                )
            digest.update(f"input {given}\0".encode())
            _hash_tree(path, digest)
        return digest.hexdigest()


def _hash_tree(path: str, digest: Any) -> None:
    """Feed names, kinds, executable bits and contents under ``path`` to ``digest``, sorted."""
    info = os.lstat(path)
    if os.path.islink(path):
        digest.update(b"L" + os.readlink(path).encode("utf-8", "surrogateescape") + b"\0")
    elif os.path.isdir(path):
        digest.update(b"D\0")
        for name in sorted(os.listdir(path)):
            if name in _SKIPPED or name.endswith(_SKIPPED_SUFFIXES):
                continue
            digest.update(b"N" + name.encode("utf-8", "surrogateescape") + b"\0")
            _hash_tree(os.path.join(path, name), digest)
    else:
        digest.update(b"F" + (b"x" if info.st_mode & 0o111 else b"-"))
        with open(path, "rb") as handle:
            while chunk := handle.read(1 << 20):
                digest.update(chunk)
        digest.update(b"\0")


def _source(function: Callable[..., Any]) -> str:
    try:
        return inspect.getsource(function)
    except (OSError, TypeError):  # defined in a REPL or exec(): its compiled code stands in
        code = function.__code__
        return repr((code.co_code, code.co_consts, code.co_names))


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in sorted(value.items(), key=lambda item: str(item[0]))}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value if isinstance(value, (str, int, float, bool)) or value is None else repr(value)


def _tag_name(name: str) -> str:
    cleaned = "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-")
    return cleaned[:60] or "template"


def _image_of(entry: dict[str, Any], store: LayerStore, name: str) -> Image | None:
    """The image an index entry describes, or None if any of its layers is gone."""
    diff_ids = [str(d) for d in entry.get("layers", [])]
    if not all(store.has_layer(d) for d in diff_ids):
        return None
    base_dir = str(entry.get("base_dir", ""))
    if base_dir and not os.path.isdir(base_dir):
        return None
    lowers = list(dict.fromkeys(store.layer_path(d) for d in reversed(diff_ids)))
    if base_dir:
        lowers.append(base_dir)
    config = ImageConfig.from_index(entry.get("config", {}))
    return Image(
        f"template {name}",
        tuple(lowers),
        config,
        tuple(diff_ids),
        base_dir,
        int(entry.get("snapshots", 1)),
        tuple(entry.get("tags", ())),
    )


@overload
def template(image: Callable[[Box], Any], /) -> Template: ...


@overload
def template(
    image: str | os.PathLike[str] | ImageSource | None = None,
    *,
    inputs: Iterable[str | os.PathLike[str]] = (),
    name: str | None = None,
    **box_options: Any,
) -> Callable[[Callable[[Box], Any]], Template]: ...


def template(
    image: Any = None,
    *,
    inputs: Iterable[str | os.PathLike[str]] = (),
    name: str | None = None,
    **box_options: Any,
) -> Any:
    """Decorate ``def setup(box): ...`` to make it an image built once per cache key.

    ``image`` is the base (a path, an ``Image``, another template; None: the session's
    ``--nsbox-image``, else the host's ``/``; a relative path is looked for beside the file
    that defines the function first, then in the working directory); ``inputs`` are files and
    directories whose content is part of the key; the other keywords are ``Box`` options for the box the setup
    runs in (``network="bridge", nat=True`` to install packages). Bare ``@template`` works too.
    """
    if callable(image) and not isinstance(image, ImageSource):
        return template()(image)  # bare @template
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]  # a single path, not its characters
    checked: list[str] = []
    for item in inputs:
        if not isinstance(item, (str, os.PathLike)):
            raise ArgumentTypeError(
                f"@template(inputs=...): expected paths, got {type(item).__name__} {item!r}"
            )
        checked.append(os.fspath(item))
    if name is not None and (not isinstance(name, str) or not name.strip()):
        raise ArgumentTypeError(f"@template(name=...): expected a non-empty string, got {name!r}")
    for option in ("cache",):
        if option in box_options:
            raise ConfigError(
                f"@template({option}=...): a template lives in the cache of the box that uses it; "
                "give cache= to that box (or --nsbox-cache)"
            )

    def decorate(function: Callable[[Box], Any]) -> Template:
        if not callable(function):
            raise ArgumentTypeError(f"@template: expected a function taking a box, got {function!r}")
        return Template(function, image, tuple(checked), dict(box_options), name)

    return decorate
