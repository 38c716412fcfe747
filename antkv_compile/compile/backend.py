"""`antkv_backend`: a torch.compile backend that stores KV caches vector-quantized.

    model = torch.compile(model, backend=antkv_backend, options={"codebooks": books, "window": 32})
    model = torch.compile(model, backend=AntKVBackend(books, anchor_frac=0.02))
    model = antkv_compile.patch(hf_model, books)          # generate() runs compiled

The backend runs the graph pass (compile/passes/kv_cache.py) on the Dynamo graph, then hands it to
Inductor. How the compressed cache crosses calls: a graph's compressed inputs and outputs are
`VQTensor`s for the user (and for Dynamo, which guards on them like any tensor subclass), but the
compiled code only sees their inner tensors: the backend flattens `VQTensor` arguments before the
call and wraps the new caches' inner tensors into `VQTensor`s after it. The first call of a model
sees a dense (or empty) past and writes back a `VQTensor`; later calls read it.

Recompilation stays bounded: the caches it returns have their sequence length marked dynamic and
their window / anchor lengths unbacked (the custom ops' fake kernels never guard on them), so the
decode step is traced for all lengths: prefill, decode, and once more when the anchor count first
grows (Dynamo guards the strides that follow it, then makes them dynamic): at most 3 graphs.
"""

from __future__ import annotations

import difflib
import functools
import itertools
import logging
import types
import warnings

import torch
import torch.fx as fx

from .. import settings as _settings
from ..cache import StaticVQTensor, VQTensor
from ..quant.codebook import Codebooks
from ..quant.pq import spec_for_bits
from ..state import UNBACKED_FIELDS, Side
from .passes.kv_cache import PassResult, Site, copy_graph_module, keeps_kv_cache, kv_cache_pass

log = logging.getLogger(__name__)

_GRAPH_IDS = itertools.count()
# Options of ours besides the cache settings (settings.NAMES).
_OPTIONS = ("codebooks", "bits", "inductor", "on_nothing_compressed")
ON_NOTHING_COMPRESSED = ("error", "warn")


class CompressionError(RuntimeError):
    """A model asked to compress its KV cache has a graph with a KV cache whose every attention
    site was declined: it would run on a dense cache. The message lists every site's reason."""


def own_code(fn, name: str):
    """A function calling `fn` whose code object is its alone (named `name`). Dynamo keeps its
    graphs, recompile count (8 per code object) and what it made dynamic per code object, and
    every transformers model's forward is the same one (the `deprecate_kwarg` wrapper): compiled
    as is, a second model of another head_dim finds its attention scale symbolic (every site
    declined), and the fifth hits the recompile limit and runs eagerly."""

    def call(*args, **kwargs):
        return fn(*args, **kwargs)

    code = call.__code__.replace(co_name=name)
    return functools.wraps(fn, updated=())(types.FunctionType(code, call.__globals__, name, None, call.__closure__))


def mark_growing(cache: VQTensor) -> VQTensor:
    """Tell Dynamo which sizes of a compressed cache will change, so the next trace is general.

    The backend marks the caches it returns; call it on a cache built outside a compiled model
    (loaded, or appended to eagerly) before its first compiled call, or that call compiles a graph
    for its exact length and the next one recompiles. Returns the cache to pass: a cache appended
    to eagerly holds views of capacity buffers (cache.py), whose strides the compiled graph's own
    outputs would not match (one more recompile): it comes back compact (a clone)."""
    if cache._buffers is not None:
        cache = cache.clone()
    torch._dynamo.maybe_mark_dynamic(cache, cache.seq_dim)
    torch._dynamo.maybe_mark_dynamic(cache.codes, 2)
    for name in UNBACKED_FIELDS:
        torch._dynamo.decorators.mark_unbacked(getattr(cache, name), 2)
    return cache


def inner_tensors(cache) -> list:
    """What the rewritten graph takes for a compressed cache, in order (`graph_fields`: a
    VQTensor's inner tensors, through `.side`, which raises on a superseded state; a static
    cache's buffers and book)."""
    if isinstance(cache, VQTensor):
        return list(cache.side)
    return [getattr(cache, f) for f in cache.graph_fields]


class _CompiledGraph:
    """Calls the compiled graph on flattened caches and wraps the new caches it returns."""

    def __init__(self, fn, vq_inputs: list[bool], result: PassResult, num_outputs: int):
        self.fn, self.vq_inputs, self.result, self.num_outputs = fn, vq_inputs, result, num_outputs

    def __call__(self, *args):
        flat = []
        for arg, is_vq in zip(args, self.vq_inputs):
            flat.extend(inner_tensors(arg)) if is_vq else flat.append(arg)
        flat.extend(self.result.extra_inputs)
        outs = list(self.fn(*flat))
        for out in self.result.vq_outputs:
            outs[out.index] = mark_growing(VQTensor(Side(*(outs[j] for j in out.inner)), out.settings, out.dtype, out.seq_dim))
        return tuple(outs[: self.num_outputs])


class AntKVBackend:
    """A torch.compile backend with its settings:

    - codebooks: a `Codebooks`, one per layer (the layer a cache belongs to, as Dynamo names it).
      Without them each layer fits a data-free codebook of `bits` per element (quant/datafree.py)
      to its first call's keys and values;
    - the cache settings: window, anchor_frac, error (see `CacheSettings`);
    - inductor: False runs the rewritten graph as is (explain(), fast tests);
    - on_nothing_compressed: what a graph with a KV cache gets when the pass rewrites none of its
      attention sites (it would run on a dense cache): "error" (default) raises CompressionError
      when it is called, "warn" runs it dense with a warning. Sites waiting for enough tokens to
      learn a codebook (no codebooks given) only warn.

    Options of torch.compile(options=...) that are not ours go to Inductor's config.

    `sites` keeps the report of every attention site of every graph compiled so far."""

    def __init__(
        self, codebooks: Codebooks | None = None, *, bits: float = 1.0, inductor: bool = True, inductor_config: dict | None = None,
        on_nothing_compressed: str = "error", **settings,
    ):  # fmt: skip
        if on_nothing_compressed not in ON_NOTHING_COMPRESSED:
            raise ValueError(f"on_nothing_compressed must be one of {ON_NOTHING_COMPRESSED}, got {on_nothing_compressed!r}")
        self.codebooks, self.bits, self.given = codebooks, bits, settings
        self.on_nothing_compressed = on_nothing_compressed
        self.settings = _settings.resolve(codebooks, **settings)
        self.online = None if codebooks is not None else spec_for_bits(bits)
        self.inductor, self.inductor_config = inductor, dict(inductor_config or {})
        self.sites: list[Site] = []

    def configured(self, options: dict) -> "AntKVBackend":
        """A backend with `options` (torch.compile's options=...) applied over these settings: ours
        (codebooks, bits, inductor, the cache settings), the rest Inductor's config. A name that
        is neither raises, with the closest known names."""
        ours, rest = _settings.split(dict(options))
        extra = {k: rest.pop(k) for k in _OPTIONS if k in rest}
        _check_inductor_options(rest)
        kwargs = {"codebooks": self.codebooks, "bits": self.bits, "inductor": self.inductor, "on_nothing_compressed": self.on_nothing_compressed, **extra}
        backend = AntKVBackend(**kwargs, inductor_config={**self.inductor_config, **rest}, **{**self.given, **ours})
        backend.sites = self.sites  # one report across configured copies
        return backend

    def __call__(self, gm: fx.GraphModule, example_inputs, options: dict | None = None, mode: str | None = None):
        if options:
            return self.configured(options)(gm, example_inputs)
        placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        output = next(n for n in reversed(gm.graph.nodes) if n.op == "output")
        num_outputs = len(output.args[0]) if isinstance(output.args[0], (tuple, list)) else 1
        graph_id = next(_GRAPH_IDS)
        original, gm = gm, copy_graph_module(gm)
        result = kv_cache_pass(gm, self.codebooks, self.settings, graph_id, self.online)
        for site in result.sites:
            self.sites.append(site)
            log.info("antkv: %s", site)
        vq_inputs = [n.name in result.vq_inputs for n in placeholders]
        leftover = [n.name for n in gm.graph.nodes if n.op == "placeholder" and isinstance(n.meta.get("example_value"), (VQTensor, StaticVQTensor))]
        if leftover:
            log.warning("antkv: graph %d reads compressed caches %s outside a rewritten site: it runs eagerly", graph_id, leftover)
            return original.forward
        refusal = self._nothing_compressed(gm, result, graph_id)
        if refusal is not None:
            return refusal
        flat_inputs = []
        fake_mode = torch._guards.detect_fake_mode(example_inputs)
        for arg, is_vq in zip(example_inputs, vq_inputs):
            if not is_vq:
                flat_inputs.append(arg)
                continue
            for name, t in zip(type(arg).graph_fields, inner_tensors(arg)):  # Dynamo's fakes; a static cache's book is ours
                flat_inputs.append(t if name in arg.inner_fields or fake_mode is None else fake_mode.from_tensor(t, static_shapes=True))
        for t in result.extra_inputs:
            flat_inputs.append(fake_mode.from_tensor(t, static_shapes=True) if fake_mode else t)
        fn = gm
        if self.inductor:
            from torch._inductor.compile_fx import compile_fx

            from ..inductor import attention  # noqa: F401  (registers the Inductor lowering of antkv::attention)

            fn = compile_fx(gm, flat_inputs, config_patches=self.inductor_config or None)
        return _CompiledGraph(fn, vq_inputs, result, num_outputs)

    def _nothing_compressed(self, gm: fx.GraphModule, result: PassResult, graph_id: int):
        """If the graph keeps a KV cache (`keeps_kv_cache`) and the pass rewrote none of its sites:
        warn, or return a callable raising CompressionError (raised when called, so the user gets
        it as is, not wrapped in Dynamo's BackendCompilerFailed). None: compile as usual."""
        if not result.sites or any(site.rewritten for site in result.sites) or not keeps_kv_cache(gm):
            return None
        reasons = "\n".join(f"  {site}" for site in result.sites)
        message = (
            f"antkv: graph {graph_id} has a KV cache but none of its {len(result.sites)} attention sites could be "
            f"compressed, so it would run on a dense cache:\n{reasons}\n"
            "What to do: fix what the reasons name (codebooks calibrated for this model: antkv_compile.calibrate(model, ids); "
            "inference under torch.no_grad(); ...); antkv_compile.explain(model, *inputs) lists every site. "
        )
        if self.on_nothing_compressed == "warn":
            warnings.warn(message + 'It runs dense (on_nothing_compressed="warn").', stacklevel=2)
            return None
        message += 'To run such graphs dense with a warning instead, pass on_nothing_compressed="warn".'

        def refuse(*args):
            raise CompressionError(message)

        return refuse


def _check_inductor_options(options: dict) -> None:
    """Raise on torch.compile options that are neither ours nor Inductor config names."""
    from torch._inductor import config

    known = set(config.get_config_copy())
    unknown = [k for k in options if k not in known]
    if unknown:
        names = [*_OPTIONS, *_settings.NAMES]
        hints = [f"{k!r} (did you mean {', '.join(map(repr, close))}?)" if (close := difflib.get_close_matches(k, names + sorted(known), 3)) else repr(k)
                 for k in unknown]  # fmt: skip
        raise TypeError(
            f"antkv_backend: unknown option {', '.join(hints)}. Options are ours ({', '.join(names)}) "
            f"or torch._inductor.config names."
        )


antkv_backend = AntKVBackend()
"""The backend with default settings; `torch.compile(m, backend=antkv_backend, options={...})`."""

# Registered as "antkv" by antkv_compile's _load, or by Dynamo from the torch_dynamo_backends entry point.


def explain(model, *example_args, codebooks: Codebooks | None = None, **settings) -> list[Site]:
    """Run `model(*example_args)` once through the pass (no Inductor) and print every attention site
    found: rewritten, or declined with the reason. Returns the sites. Keyword arguments other than
    the antkv settings (and bits) go to the model."""
    ours, model_kwargs = _settings.split(settings)
    if "bits" in model_kwargs:
        ours["bits"] = model_kwargs.pop("bits")
    backend = AntKVBackend(codebooks, inductor=False, on_nothing_compressed="warn", **ours)
    target = getattr(model, "antkv_original_forward", model)  # a patch()ed model: its own forward
    torch.compile(own_code(target, f"antkv_explain_{next(_GRAPH_IDS)}"), backend=backend)(*example_args, **model_kwargs)
    for site in backend.sites:
        print(site)
    return backend.sites
