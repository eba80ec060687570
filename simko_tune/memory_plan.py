"""Per-rank memory estimate of a training run, printed by ``dry_run`` before any GPU is used.

The arithmetic a 7B config states in its comments, computed from the model's shape (built on
the meta device) and the config, so that a setting that cannot fit is caught in seconds:

- fp32 master parameters, fp32 gradients, AdamW's fp32 ``m`` and ``v``: 16 bytes per
  parameter, sharded over all ``dp_shard × tp`` ranks (FSDP2 shards what TP leaves);
- FSDP2's unsharded compute copies in the compute dtype: the root (embedding, output
  projection; it is not resharded after forward) and two gathered blocks (one in use, one
  prefetched);
- with ``loss.kl_coef > 0``, the frozen reference policy: built and sharded like the policy
  (fp32, over the same ranks) but parameters only, no gradients or optimizer state; the
  recipe reshards it after its forward-only pass, so it keeps no compute copies;
- with ``ppo.defer_grad_sync`` over several data-parallel ranks, the unsharded fp32
  gradients each rank accumulates until the mini-batch's last micro-batch, and the gathered
  compute copies of the other blocks, kept between micro-batches so that no forward
  all-gathers them again;
- activations of one micro-batch (``ppo.max_tokens_per_micro_batch`` tokens, or
  ``micro_batch_size`` rows padded to prompt + response tokens), with and without
  activation checkpointing;
- the loss's chunk: ``[C, V]`` fp32 logits and their gradient, plus its fp32 ``[V, D]``
  weight-gradient accumulator;
- the weights published to the generation engines, in the engine's dtype.

Activations per token per block, in the compute dtype, are what autograd keeps in a
Qwen2/Llama block with fused (SDPA) attention, which stores no ``[T, T]`` scores: the two
norms' inputs and outputs (4·D, replicated under TP), and, split over TP, the query and
attention output (2·D), keys and values (2·D_kv), and the SwiGLU's gate, up, activation and
product (4·I). With checkpointing only each block's input (D) is kept, and one block's
activations are rebuilt at a time in backward. An estimate: allocator fragmentation,
NCCL buffers and the CUDA context (about 1 GiB) come on top.

The copies of the published weights add up per node instead (:func:`weight_copies`): the
sync dir's publications, each local generator's rebuilt delta copies and the trainer's delta
base. ``dry_run`` prints their totals; the run checks the free space at its start
(:func:`check_weight_space`).
"""

from __future__ import annotations

import os
import shutil
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from omegaconf import DictConfig

from simko_tune.config import ConfigError, resolve_weight_transfer
from simko_tune.generation.sync_dir import private_root
from simko_tune.parallel.collectives import broadcast_object, rank

GIB = 2**30
# Bytes per element of the dtype names that configs use (engine_kwargs.dtype, mixed_precision).
_DTYPE_BYTES = {
    "bfloat16": 2,
    "bf16": 2,
    "float16": 2,
    "half": 2,
    "fp16": 2,
    "float32": 4,
    "float": 4,
    "fp32": 4,
}
FP32 = 4
MASTER_BYTES = FP32  # the recipe builds the model in fp32; FSDP2 keeps fp32 master weights


@dataclass(frozen=True)
class ModelShape:
    """The sizes the estimate needs, read off a torchtune ``TransformerDecoder``."""

    num_params: int
    root_params: int  # embedding, final norm, untied output projection: FSDP2's root unit
    block_params: int
    num_layers: int
    dim: int
    kv_dim: int
    intermediate_dim: int
    vocab_size: int

    @classmethod
    def from_model(cls, model: torch.nn.Module) -> ModelShape:
        block = model.layers[0]
        block_params = sum(p.numel() for p in block.parameters())
        num_params = sum(p.numel() for p in model.parameters())
        attn = block.attn
        return cls(
            num_params=num_params,
            root_params=num_params - len(model.layers) * block_params,
            block_params=block_params,
            num_layers=len(model.layers),
            dim=model.tok_embeddings.embedding_dim,
            kv_dim=attn.num_kv_heads * attn.head_dim,
            intermediate_dim=block.mlp.w1.out_features,
            vocab_size=model.tok_embeddings.num_embeddings,
        )


@dataclass
class MemoryPlan:
    """Bytes per trainer rank (``publication``: bytes of one weight publication)."""

    parameters: int
    gradients: int
    optimizer_state: int
    compute_copies: int
    reference: int  # the KL penalty's frozen reference policy (loss.kl_coef > 0)
    deferred_gradients: int  # unsharded fp32 gradients while sync waits for the last micro-batch
    deferred_parameters: int  # the blocks' gathered compute copies kept meanwhile
    activations_checkpointed: int
    activations_full: int
    loss_chunk: int
    publication: int
    delta_base: int  # host RAM: the last publication's bytes, kept for the next delta
    activation_checkpointing: bool
    device_memory: int | None  # bytes; None when neither the config nor the device says
    notes: dict[str, str] = field(default_factory=dict)

    @property
    def activations(self) -> int:
        if self.activation_checkpointing:
            return self.activations_checkpointed
        return self.activations_full

    @property
    def total(self) -> int:
        return (
            self.parameters
            + self.gradients
            + self.optimizer_state
            + self.compute_copies
            + self.reference
            + self.deferred_gradients
            + self.deferred_parameters
            + self.activations
            + self.loss_chunk
        )

    def warnings(self) -> list[str]:
        if self.device_memory is None or self.total <= self.device_memory:
            return []
        hint = (
            ""
            if self.activation_checkpointing
            else " (parallel.activation_checkpointing=true would need "
            f"{(self.total - self.activations_full + self.activations_checkpointed) / GIB:.1f} GiB)"
        )
        return [
            f"memory plan: about {self.total / GIB:.1f} GiB per trainer rank exceeds the "
            f"device's {self.device_memory / GIB:.1f} GiB{hint}; lower ppo.micro_batch_size "
            "or loss.chunk_size, or shard over more ranks"
        ]

    def to_dict(self) -> dict:
        out = {k: v for k, v in asdict(self).items() if k != "notes"}
        out.update(total=self.total, warnings=self.warnings(), notes=dict(self.notes))
        return out

    def report(self) -> list[str]:
        """Human-readable lines for ``dry_run``."""

        def gib(x: int) -> str:
            return f"{x / GIB:8.2f} GiB"

        used = "with" if self.activation_checkpointing else "without"
        lines = [
            f"parameters (fp32)      {gib(self.parameters)}",
            f"gradients (fp32)       {gib(self.gradients)}",
            f"optimizer state        {gib(self.optimizer_state)}   {self.notes['optimizer']}",
            f"compute copies         {gib(self.compute_copies)}   {self.notes['compute']}",
            f"reference model        {gib(self.reference)}   {self.notes['reference']}",
            f"deferred gradients     {gib(self.deferred_gradients)}   {self.notes['deferred']}",
            f"deferred parameters    {gib(self.deferred_parameters)}",
            f"activations, AC        {gib(self.activations_checkpointed)}   {self.notes['tokens']}",
            f"activations, no AC     {gib(self.activations_full)}",
            f"loss chunk             {gib(self.loss_chunk)}   {self.notes['loss']}",
            f"total per rank         {gib(self.total)}   ({used} activation checkpointing)",
            "device                 "
            + (gib(self.device_memory) if self.device_memory else "     unknown")
            + f"   {self.notes['device']}",
            f"publication            {gib(self.publication)}   {self.notes['publication']}",
            f"delta base (host RAM)  {gib(self.delta_base)}   {self.notes['delta']}",
        ]
        return lines


def _dtype_bytes(name: str, key: str) -> int:
    try:
        return _DTYPE_BYTES[str(name).lower()]
    except KeyError:
        known = ", ".join(sorted(_DTYPE_BYTES))
        raise ValueError(f"{key}: unknown dtype {name} (known: {known})") from None


def _publication(shape: ModelShape, g: DictConfig) -> tuple[int, str]:
    """Bytes of one publication and where its dtype comes from: ``generation.weight_dtype``,
    else the engine's (the native generator computes in fp32)."""
    key, source, dtype = "generation.weight_dtype", "generation.weight_dtype", g.get("weight_dtype")
    if not dtype:
        key, source = "generation.engine_kwargs.dtype", "engine dtype"
        dtype = "float32" if g.backend == "native" else g.engine_kwargs.get("dtype", "auto")
    note = f"{source} {dtype}"
    if dtype == "auto":
        dtype, note = "bfloat16", f"{source} auto: bf16 checkpoints assumed"
    return shape.num_params * _dtype_bytes(dtype, key), note


def _optimizer_states(optimizer_cfg: DictConfig | None) -> tuple[int, str]:
    """fp32 state tensors per parameter: 2 for Adam/AdamW (m, v), 1 for SGD with momentum."""
    component = str((optimizer_cfg or {}).get("_component_", ""))
    name = component.rsplit(".", 1)[-1]
    if name.lower().startswith("adam"):
        return 2, f"{name}: fp32 m and v"
    if name == "SGD":
        momentum = float((optimizer_cfg or {}).get("momentum", 0.0))
        return (1, "SGD: fp32 momentum") if momentum else (0, "SGD: no state")
    return 2, f"{name or 'optimizer'}: assumed 2 fp32 states per parameter, as AdamW"


def device_memory_bytes(cfg: DictConfig) -> tuple[int | None, str]:
    """The memory one trainer rank may use: ``device_memory_gib`` from the config, else the
    total memory of the CUDA device this process sees, else unknown."""
    configured = cfg.get("device_memory_gib")
    if configured is not None:
        return int(float(configured) * GIB), "device_memory_gib from the config"
    if str(cfg.device).startswith("cuda") and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(torch.device(cfg.device))
        return int(props.total_memory), f"{props.name}"
    return None, "set device_memory_gib to check against a device"


def estimate_memory(shape: ModelShape, cfg: DictConfig, dp: int, tp: int) -> MemoryPlan:
    """The per-rank memory plan of ``cfg`` (a schema-checked recipe config) for a model of
    ``shape`` on a ``dp × tp`` mesh."""
    p, r = cfg.parallel, cfg.rollout
    shards = dp * tp
    compute_bytes = _dtype_bytes(p.mixed_precision or "fp32", "parallel.mixed_precision")
    fsdp = shards > 1 or compute_bytes != MASTER_BYTES  # the recipe applies FSDP2 under torchrun

    n_states, optimizer_note = _optimizer_states(cfg.get("optimizer"))
    parameters = shape.num_params * MASTER_BYTES // shards
    optimizer_state = n_states * shape.num_params * FP32 // shards

    compute_copies = 0
    compute_note = "none: one process computes with its fp32 parameters"
    if fsdp:
        compute_copies = (shape.root_params + 2 * shape.block_params) * compute_bytes // tp
        compute_note = f"root + 2 gathered blocks, {compute_bytes} B/param"

    d, kv, i = shape.dim, shape.kv_dim, shape.intermediate_dim
    per_token_block = 4 * d + (2 * d + 2 * kv + 4 * i) // tp  # elements (module docstring)
    seq = r.max_prompt_tokens + r.max_response_tokens
    # a token budget per micro-batch (ppo.max_tokens_per_micro_batch), else whole padded rows
    budget = cfg.ppo.get("max_tokens_per_micro_batch")
    tokens = int(budget) if budget else cfg.ppo.micro_batch_size * seq
    tokens_note = (
        f"budget {tokens} tokens"
        if budget
        else f"micro-batch {cfg.ppo.micro_batch_size} x {seq} tokens"
    )
    activations_full = tokens * shape.num_layers * per_token_block * compute_bytes
    activations_checkpointed = (
        tokens * shape.num_layers * d * compute_bytes + tokens * per_token_block * compute_bytes
    )

    # Chunks hold whole responses: a response longer than chunk_size is a chunk of its own.
    chunk_size = int(cfg.loss.get("chunk_size", 1024))
    chunk = min(max(chunk_size, r.max_response_tokens), tokens)
    loss_chunk = 2 * chunk * shape.vocab_size * FP32 + shape.vocab_size * d * FP32

    g = cfg.generation
    publication, publication_note = _publication(shape, g)
    deltas = bool(g.get("weight_delta", False)) and resolve_weight_transfer(g, shards)[0] == "files"

    # loss.kl_coef > 0: the recipe builds the reference like the policy (fp32, sharded over
    # the same ranks) and keeps only its parameters
    with_reference = float(cfg.loss.get("kl_coef", 0.0)) > 0
    reference = shape.num_params * MASTER_BYTES // shards if with_reference else 0
    reference_note = (
        f"loss.kl_coef > 0: fp32 parameters over {shards} ranks" if with_reference else "none"
    )

    # ppo.defer_grad_sync: FSDP2 accumulates unsharded gradients (reduce dtype fp32) on each
    # rank until the mini-batch's last micro-batch reduces them
    deferred = bool(cfg.ppo.get("defer_grad_sync", False)) and dp > 1
    deferred_gradients = shape.num_params * FP32 // tp if deferred else 0
    # ... and keeps the parameters it gathered (set_gradient_sync): every block's compute
    # copy, of which two are counted in compute_copies already
    other_blocks = shape.num_layers - 2
    deferred_parameters = (
        max(other_blocks, 0) * shape.block_params * compute_bytes // tp if deferred else 0
    )
    deferred_note = (
        f"ppo.defer_grad_sync: unsharded fp32 grads, gathered {compute_bytes} B/param blocks"
        if deferred
        else "none"
    )

    device_memory, device_note = device_memory_bytes(cfg)
    return MemoryPlan(
        parameters=parameters,
        gradients=parameters,
        optimizer_state=optimizer_state,
        compute_copies=compute_copies,
        reference=reference,
        deferred_gradients=deferred_gradients,
        deferred_parameters=deferred_parameters,
        activations_checkpointed=activations_checkpointed,
        activations_full=activations_full,
        loss_chunk=loss_chunk,
        publication=publication,
        delta_base=publication if deltas else 0,
        activation_checkpointing=bool(p.activation_checkpointing),
        device_memory=device_memory,
        notes={
            "optimizer": optimizer_note,
            "compute": compute_note,
            "reference": reference_note,
            "deferred": deferred_note,
            "tokens": tokens_note,
            "loss": f"{chunk} x {shape.vocab_size} fp32 logits + grads, [V, D] fp32 grad",
            "device": device_note,
            "publication": publication_note,
            "delta": (
                "generation.weight_delta: held by rank 0's node's ranks together, and by each "
                "worker in /dev/shm (twice: the version served and the one it rebuilds into)"
                if deltas
                else "none (generation.weight_delta=false)"
            ),
        },
    )


# ----------------------------------------------------------------------------------------
# Weight copies per node. The plan above is per trainer rank; the copies of the published
# weights add up per node instead: rank 0's node holds the sync dir's publications, each
# local generator's rebuilt delta copies (under private_root, /dev/shm where there is one)
# and the trainer's delta base, all at once.
# ----------------------------------------------------------------------------------------

_RAM_FILESYSTEMS = ("tmpfs", "ramfs")
REBUILT_EACH = 2  # a generator's rebuilt copies: the version it serves, the one it rebuilds into


@dataclass(frozen=True)
class Filesystem:
    """Where a folder's bytes go: the filesystem's mount point and type, its free bytes."""

    device: int
    mount: str
    fstype: str
    free: int

    @property
    def in_ram(self) -> bool:
        return self.fstype in _RAM_FILESYSTEMS

    @classmethod
    def of(cls, path: Path) -> Filesystem:
        """The filesystem ``path`` is (or, not made yet, will be) on."""
        path = Path(os.path.abspath(path))
        while not path.exists():
            path = path.parent
        real = os.path.realpath(path)
        try:
            with open("/proc/self/mounts") as f:
                mounts = [line.split()[1:3] for line in f if len(line.split()) > 2]
        except OSError:  # not Linux: mount and type unknown, the free space still known
            mounts = []
        holding = [
            (point.replace("\\040", " "), kind)
            for point, kind in mounts
            if real == point or real.startswith(point.rstrip("/") + "/")
        ]
        # the deepest mount point; of two at one point, the later (it hides the earlier)
        mount, fstype = max(reversed(holding), key=lambda m: len(m[0]), default=("?", "unknown"))
        return cls(os.stat(path).st_dev, mount, fstype, shutil.disk_usage(path).free)


@dataclass(frozen=True)
class WeightCopies:
    """The copies of the published weights that rank 0's node holds at once (see above), in
    publications of ``publication`` bytes, and the filesystems their files fill."""

    publication: int
    transfer: str  # "files" | "memory" (resolve_weight_transfer)
    kept: int  # publications in the sync dir at once, counted whole
    rebuilders: int  # local generators that rebuild deltas (REBUILT_EACH copies each)
    delta_base: int  # copies the trainer's writers keep for the next delta
    snapshots: int  # in-memory transfer: copies taken at publish, held until delivered
    generator_weights: int  # generators computing on this node's CPU hold their weights
    sync_dir: str | None
    rebuilt_dir: str | None
    # (filesystem, [(what, bytes)]) for every filesystem the copies' files fill
    filesystems: list[tuple[Filesystem, list[tuple[str, int]]]] = field(default_factory=list)

    @property
    def sync_dir_bytes(self) -> int:
        return self.kept * self.publication

    @property
    def rebuilt_bytes(self) -> int:
        return self.rebuilders * REBUILT_EACH * self.publication

    @property
    def host_ram(self) -> int:
        """Files on RAM-backed filesystems (/dev/shm), plus the copies held by processes."""
        files = sum(b for fs, parts in self.filesystems if fs.in_ram for _, b in parts)
        held = self.delta_base + self.snapshots + self.generator_weights
        return files + held * self.publication

    def shortfalls(self) -> list[str]:
        """One message per filesystem with less free space than the copies' files need,
        naming the settings that need less there."""
        out = []
        for fs, parts in self.filesystems:
            need = sum(b for _, b in parts)
            if need <= fs.free:
                continue
            holds = {what for what, _ in parts}
            remedies = []
            if "rebuilt delta copies" in holds:
                remedies.append("set generation.weight_delta=false (no rebuilt copies)")
            if "sync dir" in holds:
                remedies.append("point generation.sync_dir at a larger filesystem")
            # private_root holds the default sync dirs and the rebuilt copies: a killed run's stay
            if fs.device == Filesystem.of(Path(self.rebuilt_dir)).device:
                remedies.append(
                    f"free space there (killed runs leave folders in {self.rebuilt_dir})"
                )
            held = ", ".join(f"{what} {b / GIB:.2f} GiB" for what, b in parts)
            out.append(
                f"{fs.mount} ({fs.fstype}): {fs.free / GIB:.2f} GiB free, the weight copies "
                f"of this node need {need / GIB:.2f} GiB there ({held}): " + "; or ".join(remedies)
            )
        return out

    def report(self) -> list[str]:
        """Human-readable lines for ``dry_run``."""

        def gib(x: int) -> str:
            return f"{x / GIB:8.2f} GiB"

        lines = []
        if self.transfer == "files":
            kept = ["served", "spare"] + ["next (one-step-off)"] * (self.kept - 2 - self.delta_base)
            kept += ["deltas since the newest full one"] * self.delta_base
            lines += [
                f"sync dir               {gib(self.sync_dir_bytes)}   {self.kept} publications: "
                f"{', '.join(kept)} ({self.sync_dir})",
                f"rebuilt delta copies   {gib(self.rebuilt_bytes)}   {self.rebuilders} "
                f"generator(s) x {REBUILT_EACH}: served, rebuilding into ({self.rebuilt_dir})",
            ]
        for fs, parts in self.filesystems:
            lines.append(
                f"node, {fs.mount} ({fs.fstype})".ljust(22)
                + f" {gib(sum(b for _, b in parts))}   {fs.free / GIB:.2f} GiB free on this machine"
            )
        in_ram = sum(b for fs, parts in self.filesystems if fs.in_ram for _, b in parts)
        held = [
            ("files in RAM", in_ram),
            ("delta base", self.delta_base * self.publication),
            ("snapshots", self.snapshots * self.publication),
            ("generators on CPU", self.generator_weights * self.publication),
        ]
        lines.append(
            f"node, host RAM         {gib(self.host_ram)}   "
            + " + ".join(f"{what} {b / GIB:.2f}" for what, b in held)
        )
        return lines

    def to_dict(self) -> dict:
        out = {k: v for k, v in asdict(self).items() if k != "filesystems"}
        out.update(
            sync_dir_bytes=self.sync_dir_bytes,
            rebuilt_bytes=self.rebuilt_bytes,
            host_ram=self.host_ram,
            filesystems=[
                {**asdict(fs), "need": sum(b for _, b in parts), "parts": dict(parts)}
                for fs, parts in self.filesystems
            ],
            shortfalls=self.shortfalls(),
        )
        return out


def weight_copies(
    cfg: DictConfig, publication: int, world_size: int, sync_dir: str | Path | None = None
) -> WeightCopies:
    """The weight copies of ``cfg``'s run on rank 0's node, publications of ``publication``
    bytes; their files in ``sync_dir`` (default: the config's, else under private_root) and,
    for rebuilt deltas, under private_root.

    The sync dir keeps the version every generator serves and the spare (a pruned full
    publication the next full one is written over); one-step-off, also the next version,
    published before the served one is replaced; with deltas, also the deltas since the
    newest full publication, counted as one publication (each is under the delta writer's
    max_ratio of one, and usually far smaller)."""
    g = cfg.generation
    transfer = str(resolve_weight_transfer(g, world_size)[0])
    staleness = int(cfg.rollout.max_staleness)
    files = transfer == "files"
    deltas = files and bool(g.weight_delta)
    local = 0 if g.addresses else (1 if g.backend == "native" else int(g.num_workers))
    on_cpu = str(cfg.device) == "cpu"
    copies = WeightCopies(
        publication=publication,
        transfer=transfer,
        kept=2 + staleness + int(deltas) if files else 0,
        rebuilders=local if deltas else 0,
        delta_base=int(deltas),
        snapshots=0 if files else 1 + staleness,
        generator_weights=local if on_cpu else 0,
        sync_dir=None,
        rebuilt_dir=None,
    )
    if not files:
        return copies
    sync = Path(sync_dir or g.sync_dir or private_root())
    rebuilt = private_root()
    by_device: dict[int, tuple[Filesystem, list[tuple[str, int]]]] = {}
    for path, what, size in ((sync, "sync dir", copies.sync_dir_bytes),
                             (rebuilt, "rebuilt delta copies", copies.rebuilt_bytes)):  # fmt: skip
        if size:
            fs = Filesystem.of(path)
            by_device.setdefault(fs.device, (fs, []))[1].append((what, size))
    return replace(
        copies, sync_dir=str(sync), rebuilt_dir=str(rebuilt), filesystems=list(by_device.values())
    )


def check_weight_space(
    cfg: DictConfig, publication: int, world_size: int, sync_dir: str | Path
) -> None:
    """At the start, before the first publication (collective): refuse a run whose weight
    copies on rank 0's node do not fit the free space of the filesystems they fill. Rank 0
    checks (its node holds them); every rank raises the same :class:`ConfigError`."""
    problems = None
    if rank() == 0:
        problems = weight_copies(cfg, publication, world_size, sync_dir).shortfalls()
    problems = broadcast_object(problems)
    if problems:
        raise ConfigError("not enough space for the weight copies:\n  " + "\n  ".join(problems))
