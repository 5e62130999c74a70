"""Training adapters on a frozen pipeline: LoRA (Hu et al. 2021), ControlNet (Zhang et al. 2023),
IP-Adapter (Ye et al. 2023), and a LoRA's DreamBooth-style prior preservation (Ruiz et al. 2023).

All share one loop (:func:`fit`): the images are encoded once (latent models), each step draws a
seeded batch, its times and noise, drops the text now and then so the unconditional branch of
guidance is learned too, and optimises only the adapter's parameters with the diffusion loss of the
pipeline's own process and prediction. The base network is frozen and never copied.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from difflab.adapters import ControlNet, ImagePromptAdapter, LoRA
from difflab.adapters.lora import DEFAULT_TARGETS, applied
from difflab.training.losses import diffusion_loss
from difflab.training.optim import adamw

Tensor = torch.Tensor
#: step_loss(batch) -> scalar loss; batch holds x0, t, noise, cond (the network's conditions), index
StepLoss = Callable[[dict[str, Any]], Tensor]


def fit(pipe: Any, images: Tensor, prompts: Sequence[str] | None, parameters: Sequence[torch.nn.Parameter],
        step_loss: StepLoss, *, steps: int, batch_size: int = 32, lr: float = 1e-4, seed: int = 0,
        text_dropout: float = 0.1, progress: bool = True, desc: str = "adapter",
        log: list[dict[str, float]] | None = None, max_seconds: float | None = None,
        labels: Tensor | None = None) -> int:
    """Optimise ``parameters`` for ``steps`` steps of ``step_loss`` on ``images`` (N, C, H, W) in
    [-1, 1] with their ``prompts``; deterministic for ``seed``. The network's other parameters are
    frozen. ``log`` collects each step's loss and the seconds since the first step; ``max_seconds``
    stops early (equal-time comparisons). ``labels``: the images' classes for a class-conditional
    pipeline (dropped to the null class like the text). Returns the steps taken."""
    if prompts is not None and len(images) != len(prompts):
        raise ValueError(f"{len(images)} images for {len(prompts)} prompts")
    if prompts is None and pipe.text_encoder_config is not None:
        raise ValueError("this pipeline is text-conditional: give a prompt for each training image")
    if (labels is None) != (not pipe.num_classes):
        raise ValueError("this pipeline is class-conditional: give labels=, a class for each training image"
                         if pipe.num_classes else "this pipeline takes no class labels")
    if labels is not None and len(labels) != len(images):
        raise ValueError(f"{len(images)} images for {len(labels)} labels")
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    parameters = list(parameters)
    pipe.network.eval().requires_grad_(False)
    for p in parameters:
        p.requires_grad_(True)
    device = pipe.device
    with torch.no_grad():
        data = torch.cat([pipe.vae.to_latent(images[i: i + 256].to(device)) for i in range(0, len(images), 256)]) \
            if pipe.vae is not None else images.to(device)
    text = null = None
    if prompts is not None:
        encoder = pipe.text_encoder()
        distinct = sorted(set(prompts))
        row = {p: i for i, p in enumerate(distinct)}
        rows = torch.tensor([row[p] for p in prompts])
        table = {k: v.to(device) for k, v in encoder(distinct).items()}
        text = {k: v[rows.to(device)] for k, v in table.items()}
        null = {k: v.to(device) for k, v in encoder.null(1).items()}
    optimizer = adamw(parameters, lr)
    process = pipe.process
    bar = tqdm(range(steps), desc=desc, disable=not progress, dynamic_ncols=True)
    start, taken = time.perf_counter(), 0
    for _ in bar:
        if max_seconds is not None and time.perf_counter() - start > max_seconds:
            break
        idx = torch.randint(len(data), (batch_size,), generator=g)
        t = process.sample_t(batch_size, distribution="logit_normal", generator=g).to(device)
        noise = torch.randn((batch_size, *data.shape[1:]), generator=g).to(device)
        drop = (torch.rand(batch_size, generator=g) < text_dropout).to(device)
        cond = {}
        if text is not None:
            cond = {k: torch.where(drop.view(-1, *([1] * (v.ndim - 1))), null[k].expand_as(v[idx]), v[idx])
                    for k, v in text.items() if k != "pooled" or getattr(pipe.network.config, "pooled_dim", None)}
        if labels is not None:
            cond["class_labels"] = torch.where(drop, -1, labels[idx].to(device))
        loss = step_loss({"x0": data[idx.to(device)], "t": t, "noise": noise, "cond": cond, "index": idx,
                          "generator": g})
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        value = float(loss.detach())
        taken += 1
        if log is not None:
            log.append({"loss": value, "seconds": time.perf_counter() - start})
        bar.set_postfix(loss=f"{value:.4f}")
    return taken


def train_lora(pipe: Any, images: Tensor, prompts: Sequence[str] | None = None, *, rank: int = 4,
               alpha: float | None = None, targets: Sequence[str] = DEFAULT_TARGETS, dropout: float = 0.0,
               steps: int = 1000, batch_size: int = 32, lr: float = 1e-3, seed: int = 0,
               prior: tuple[Tensor, Sequence[str]] | None = None, prior_weight: float = 1.0,
               text_dropout: float = 0.1, progress: bool = True, log: list | None = None,
               max_seconds: float | None = None, labels: Tensor | None = None) -> LoRA:
    """A LoRA for ``pipe`` trained on ``images`` (and their ``prompts``). ``prior``: (images,
    prompts) of the class the new concept belongs to, made by the base model, whose loss (times
    ``prior_weight``) keeps the LoRA from forgetting the class (DreamBooth's prior preservation,
    Ruiz et al. 2023)."""
    torch.manual_seed(seed)
    lora = LoRA(pipe.network, rank=rank, alpha=alpha, targets=targets, dropout=dropout).to(pipe.device)
    lora.train()
    if prior is not None:  # one set: the concept's images first, the class's after, each half of a batch
        prior_images, prior_prompts = prior
        n_concept = len(images)
        images = torch.cat([images, prior_images])
        prompts = [*prompts, *prior_prompts] if prompts is not None else None
    process, prediction, net = pipe.process, pipe.prediction, pipe.network

    def step_loss(batch: dict[str, Any]) -> Tensor:
        with applied(net, lora):
            losses = diffusion_loss(net, batch["x0"], process, prediction, t=batch["t"], noise=batch["noise"],
                                    **batch["cond"])
        if prior is None:
            return losses.mean()
        is_prior = (batch["index"] >= n_concept).to(losses.device)
        concept = losses[~is_prior].mean() if bool((~is_prior).any()) else losses.sum() * 0
        kept = losses[is_prior].mean() if bool(is_prior.any()) else losses.sum() * 0
        return concept + prior_weight * kept

    fit(pipe, images, prompts, list(lora.parameters()), step_loss, steps=steps, batch_size=batch_size, lr=lr,
        seed=seed, text_dropout=text_dropout, progress=progress, desc=f"LoRA rank {rank}", log=log,
        max_seconds=max_seconds, labels=labels)
    return lora.eval()


#: the layers an LCM-LoRA updates by default: every linear and convolution layer (Luo et al. 2023b
#: adapt attention, feed-forward, residual-block and time-embedding layers of SD's U-Net alike)
CONSISTENCY_LORA_TARGETS = ("*",)


def train_consistency_lora(pipe: Any, images: Tensor, prompts: Sequence[str] | None = None, *, rank: int = 8,
                           alpha: float | None = None, targets: Sequence[str] = CONSISTENCY_LORA_TARGETS,
                           steps: int = 1000, batch_size: int = 32, lr: float = 1e-3, seed: int = 0,
                           solver: str = "heun", schedule: str = "karras", steps_start: int = 10,
                           steps_end: int = 40, skip: int = 1, huber_c: float | None = None,
                           teacher_scale: float = 1.0, text_dropout: float = 0.1, progress: bool = True,
                           log: list | None = None, max_seconds: float | None = None,
                           labels: Tensor | None = None) -> LoRA:
    """LCM-LoRA (Luo et al. 2023, "LCM-LoRA: A Universal Stable-Diffusion Acceleration Module"):
    consistency distillation (:class:`~difflab.training.distill.consistency.ConsistencyObjective`)
    of ``pipe`` into a LoRA on ``pipe`` itself — the frozen base is the teacher, the base with the
    LoRA the student — so a few-step sampler is an adapter of a few megabytes that loads onto the
    base (and stacks with other LoRAs) instead of a second model. The teacher takes ``solver`` steps
    of ``skip`` grid points of the ``schedule``'s N-step grid (N from ``steps_start`` doubling to
    ``steps_end`` over training), guided at ``teacher_scale``; the student carries no guidance
    input (a LoRA cannot add one), so it learns the map at that one scale, as LCM-LoRA does. The
    LoRA records that it samples with the ``consistency`` sampler; ``images`` (and their
    ``prompts`` / ``labels``) give the data points the training paths start from."""
    from difflab.training.distill.consistency import ConsistencyObjective
    from difflab.training.distill.teacher import Teacher

    torch.manual_seed(seed)
    net = pipe.network
    lora = LoRA(net, rank=rank, alpha=alpha, targets=targets,
                student={"method": "lcm-lora", "sampler": "consistency", "steps": []}).to(pipe.device)
    lora.train()
    teacher = Teacher.from_pipeline(pipe, teacher_scale)  # the network without the LoRA
    objective = ConsistencyObjective(pipe.process, pipe.prediction, teacher, steps, schedule, steps_start, steps_end,
                                     solver, huber_c, skip)
    taken = [0]

    def student(x: Tensor, time: Tensor, **cond: Any) -> Tensor:
        with applied(net, lora):
            return net(x, time, **cond)

    def step_loss(batch: dict[str, Any]) -> Tensor:
        b = len(batch["x0"])
        consistency_batch = {"x0": batch["x0"], "noise": batch["noise"], "step": torch.full((b,), taken[0]),
                             "seeds": torch.randint(2**31 - 1, (b,), generator=batch["generator"])}
        taken[0] += 1
        return objective(student, consistency_batch, **batch["cond"])

    fit(pipe, images, prompts, list(lora.parameters()), step_loss, steps=steps, batch_size=batch_size, lr=lr,
        seed=seed, text_dropout=text_dropout, progress=progress, desc=f"LCM-LoRA rank {rank}", log=log,
        max_seconds=max_seconds, labels=labels)
    return lora.eval()


def finetune(pipe: Any, images: Tensor, prompts: Sequence[str] | None = None, *, steps: int = 1000,
             batch_size: int = 32, lr: float = 1e-4, seed: int = 0, text_dropout: float = 0.1,
             progress: bool = True, log: list | None = None, max_seconds: float | None = None) -> Any:
    """A full fine-tune of a copy of ``pipe``'s network on ``images`` (the baseline a LoRA is
    measured against); returns a new pipeline, ``pipe`` is left as it was."""
    from difflab.pipeline import Pipeline

    tuned = Pipeline.from_parts(pipe.config(), copy.deepcopy(pipe.network), pipe.vae)
    process, prediction, net = pipe.process, pipe.prediction, tuned.network

    def step_loss(batch: dict[str, Any]) -> Tensor:
        return diffusion_loss(net, batch["x0"], process, prediction, t=batch["t"], noise=batch["noise"],
                              **batch["cond"]).mean()

    fit(tuned, images, prompts, list(net.parameters()), step_loss, steps=steps, batch_size=batch_size, lr=lr,
        seed=seed, text_dropout=text_dropout, progress=progress, desc="full fine-tune", log=log,
        max_seconds=max_seconds)
    net.requires_grad_(False)
    return tuned


def train_controlnet(pipe: Any, images: Tensor, prompts: Sequence[str] | None, controls: Tensor, *,
                     steps: int = 2000, batch_size: int = 32, lr: float = 1e-4, seed: int = 0,
                     text_dropout: float = 0.1, controlnet: ControlNet | None = None, progress: bool = True,
                     log: list | None = None, labels: Tensor | None = None) -> ControlNet:
    """A ControlNet for ``pipe`` trained on ``images`` with their control images ``controls``
    (N, C, H, W; for a latent model at the images' size, the VAE's factor above the latents).
    ``controlnet`` continues training one."""
    if len(controls) != len(images):
        raise ValueError(f"{len(controls)} control images for {len(images)} images")
    torch.manual_seed(seed)
    downscale = images.shape[-1] // pipe.sample_shape[-1]
    net = pipe.network
    cn = controlnet or ControlNet(net, controls.shape[1], downscale=downscale)
    cn.train()
    controls = controls.to(pipe.device)
    process, prediction = pipe.process, pipe.prediction

    def step_loss(batch: dict[str, Any]) -> Tensor:
        control = controls[batch["index"].to(controls.device)]

        def controlled(x: Tensor, time: Tensor, **cond: Any) -> Tensor:
            return net(x, time, residuals=cn(x, time, control, **cond), **cond)

        return diffusion_loss(controlled, batch["x0"], process, prediction, t=batch["t"], noise=batch["noise"],
                              **batch["cond"]).mean()

    fit(pipe, images, prompts, list(cn.parameters()), step_loss, steps=steps, batch_size=batch_size, lr=lr,
        seed=seed, text_dropout=text_dropout, progress=progress, desc="ControlNet", log=log, labels=labels)
    return cn.eval()


def train_controlnet_reward(pipe: Any, controlnet: ControlNet, images: Tensor, prompts: Sequence[str] | None,
                            controls: Tensor, classes: Tensor, segmenter: torch.nn.Module, *, steps: int = 500,
                            batch_size: int = 32, lr: float = 5e-5, reward_weight: float = 0.5, t_max: float = 0.25,
                            seed: int = 0, text_dropout: float = 0.1, progress: bool = True,
                            log: list | None = None, consistency_log: list | None = None,
                            labels: Tensor | None = None) -> ControlNet:
    """ControlNet++ (Li et al. 2024, "ControlNet++: Improving Conditional Controls with Efficient
    Consistency Feedback"): fine-tune ``controlnet`` with its diffusion loss plus ``reward_weight``
    times a cycle-consistency loss — the training image noised lightly (t below ``t_max``),
    denoised in one step under its control, decoded, segmented by the differentiable ``segmenter``
    and compared (cross-entropy) with the input's ``classes`` map (N, H, W) — so the control is
    followed, not just learned on average. ``consistency_log`` collects each step's consistency loss."""
    controls, classes = controls.to(pipe.device), classes.to(pipe.device)
    net, process, prediction = pipe.network, pipe.process, pipe.prediction
    segmenter.requires_grad_(False)
    if pipe.vae is not None:
        pipe.vae.requires_grad_(False)
    from difflab.denoiser import Denoiser

    def step_loss(batch: dict[str, Any]) -> Tensor:
        idx = batch["index"].to(controls.device)
        control = controls[idx]

        def controlled(x: Tensor, time: Tensor, **cond: Any) -> Tensor:
            return net(x, time, residuals=controlnet(x, time, control, **cond), **cond)

        diffusion = diffusion_loss(controlled, batch["x0"], process, prediction, t=batch["t"], noise=batch["noise"],
                                   **batch["cond"]).mean()
        t = batch["t"] * t_max  # lightly noised: one step recovers the image
        x_t = process.add_noise(batch["x0"], batch["noise"], t)
        x0 = Denoiser(controlled, process, prediction)(x_t, t, **batch["cond"])
        image = pipe.vae.from_latent(x0) if pipe.vae is not None else x0
        consistency = torch.nn.functional.cross_entropy(segmenter(image.clamp(-1, 1)), classes[idx])
        if consistency_log is not None:
            consistency_log.append(float(consistency.detach()))
        return diffusion + reward_weight * consistency

    fit(pipe, images, prompts, list(controlnet.parameters()), step_loss, steps=steps, batch_size=batch_size, lr=lr,
        seed=seed, text_dropout=text_dropout, progress=progress, desc="ControlNet++", log=log, labels=labels)
    return controlnet.eval()


def train_image_prompt(pipe: Any, images: Tensor, prompts: Sequence[str], *, steps: int = 1500,
                       batch_size: int = 32, lr: float = 3e-4, tokens: int = 4, seed: int = 0,
                       text_dropout: float = 0.1, image_dropout: float = 0.05, progress: bool = True
                       ) -> ImagePromptAdapter:
    """An IP-Adapter for ``pipe`` (text-conditional) trained on ``images`` with their ``prompts``:
    each image is its own reference; the image is dropped now and then (its "no image" tokens) so
    both guidance branches are learned."""
    if pipe.text_encoder_config is None:
        raise ValueError("an image-prompt adapter is trained on a text-conditional pipeline")
    torch.manual_seed(seed)
    net = pipe.network
    adapter = ImagePromptAdapter(net, image_channels=images.shape[1], tokens=tokens).to(pipe.device)
    references = images.to(pipe.device)
    process, prediction = pipe.process, pipe.prediction

    def step_loss(batch: dict[str, Any]) -> Tensor:
        idx = batch["index"].to(references.device)
        drop = (torch.rand(len(idx), generator=batch["generator"]) < image_dropout).to(references.device)
        tokens_ = adapter.embed(references[idx])
        tokens_ = torch.where(drop.view(-1, 1, 1), adapter.null_tokens(tokens_[:, 0]), tokens_)
        with net.hook_attention(adapter.processor(tokens_, 1.0), "cross"):
            return diffusion_loss(net, batch["x0"], process, prediction, t=batch["t"], noise=batch["noise"],
                                  **batch["cond"]).mean()

    fit(pipe, images, prompts, list(adapter.parameters()), step_loss, steps=steps, batch_size=batch_size, lr=lr,
        seed=seed, text_dropout=text_dropout, progress=progress, desc="image-prompt adapter")
    return adapter.eval()



#: what an adapter recipe writes into its out_dir (removed first when it is overwritten)
ADAPTER_OUTPUTS = ("lora.json", "lora.safetensors", "controlnet.json", "controlnet.safetensors", "recipe.json",
                   "prior.png", "training.jsonl")


def run_recipe(config: dict[str, Any], *, overwrite: bool = False, progress: bool = True) -> Path:
    """Train what an adapter recipe describes (``difflab adapt``; :data:`~difflab.training.config.
    ADAPTER_DEFAULTS`): a LoRA — with DreamBooth's prior preservation when ``prior.n`` > 0, its
    class images made by the base from ``prior.prompts`` —, an LCM-LoRA (``kind = "lcm_lora"``:
    :func:`train_consistency_lora` with the ``[consistency]`` options) or a ControlNet on the
    dataset's ``data.control`` maps. Writes the adapter (with the base's identity), the recipe and
    the losses to ``out_dir``; returns it."""
    import json

    from difflab import data as datasets
    from difflab.files import claim_output, write_atomic
    from difflab.interop import open_pipeline
    from difflab.training.config import ConfigError

    if not config["base"]:
        raise ConfigError("base is empty: give the pipeline folder the adapter is trained for (e.g. a training "
                          "run's OUT_DIR/final)")
    pipe = open_pipeline(config["base"])
    out = claim_output(config["out_dir"], ADAPTER_OUTPUTS, overwrite=overwrite, what="adapter")
    t = config["train"]
    if t["num_threads"]:
        torch.set_num_threads(int(t["num_threads"]))
    try:
        dataset = datasets.build(config["data"]["name"], **config["data"]["options"])
    except TypeError as err:
        raise ConfigError(f"[data.options] for {config['data']['name']!r}: {err}") from err
    items = [dataset[i] for i in range(len(dataset))]
    images = torch.stack([it["x"] for it in items])
    prompts = labels = None
    if pipe.text_encoder_config is not None:
        if "caption" not in items[0]:
            raise ConfigError(f"the base is text-conditional but the {config['data']['name']!r} data has no captions "
                              "(an image folder takes NAME.txt beside NAME.png)")
        prompts = [it["caption"] for it in items]
    elif pipe.num_classes:
        labels = torch.tensor([it["label"] for it in items])
    common = {"steps": t["steps"], "batch_size": t["batch_size"], "lr": t["lr"], "seed": config["seed"],
              "text_dropout": t["text_dropout"], "progress": progress, "labels": labels}
    log: list[dict[str, float]] = []
    if config["kind"] == "lora":
        lo, prior = config["lora"], None
        if config["prior"]["n"]:
            if not config["prior"]["prompts"] or prompts is None:
                raise ConfigError("prior.n > 0 needs prior.prompts (the class the concept belongs to) and a "
                                  "text-conditional base")
            wanted = [config["prior"]["prompts"][i % len(config["prior"]["prompts"])]
                      for i in range(config["prior"]["n"])]
            from difflab.plotting import image_grid

            made = pipe(len(wanted), prompts=wanted, steps=config["prior"]["steps"], seed=10**6 + config["seed"])
            image_grid(made.images, scale=max(1, 64 // made.images.shape[-1])).save(out / "prior.png")
            prior = (made.images, wanted)
        adapter = train_lora(pipe, images, prompts, rank=lo["rank"], alpha=lo["alpha"] or None,
                             targets=tuple(lo["targets"]), dropout=lo["dropout"], prior=prior,
                             prior_weight=config["prior"]["weight"], log=log, **common)
    elif config["kind"] == "lcm_lora":
        lo, c = config["lora"], config["consistency"]
        if c["steps_start"] > c["steps_end"]:
            raise ConfigError(f"consistency.steps_start ({c['steps_start']}) must not exceed consistency.steps_end "
                              f"({c['steps_end']}): the curriculum doubles the grid from one to the other")
        try:
            adapter = train_consistency_lora(pipe, images, prompts, rank=lo["rank"], alpha=lo["alpha"] or None,
                                             targets=tuple(lo["targets"]), solver=c["solver"],
                                             schedule=c["schedule"], steps_start=c["steps_start"],
                                             steps_end=c["steps_end"], skip=c["skip"],
                                             huber_c=None if c["huber_c"] < 0 else c["huber_c"],
                                             teacher_scale=c["teacher_scale"], log=log, **common)
        except ValueError as err:  # a base it cannot distil: x0 prediction, guidance with no condition
            raise ConfigError(f"LCM-LoRA on {config['base']}: {err}") from err
    else:
        key = config["data"]["control"]
        if key not in items[0] or not isinstance(items[0][key], torch.Tensor) or items[0][key].ndim != 3:
            maps = [k for k, v in items[0].items() if isinstance(v, torch.Tensor) and v.ndim == 3 and k != "x"]
            raise ConfigError(f"data.control = {key!r} is not a control map of the {config['data']['name']!r} data; "
                              f"it has: {', '.join(maps) or 'none'}")
        controls = torch.stack([it[key].float() for it in items])
        cn = ControlNet(pipe.network, controls.shape[1], downscale=images.shape[-1] // pipe.sample_shape[-1],
                        hint_width=config["controlnet"]["hint_width"], blocks=config["controlnet"]["blocks"] or None)
        adapter = train_controlnet(pipe, images, prompts, controls, controlnet=cn, log=log, **common)
    adapter.save_pretrained(out, base_identity=pipe.identity())
    write_atomic(out / "recipe.json", json.dumps(config, indent=1).encode())
    write_atomic(out / "training.jsonl", "".join(json.dumps(r) + "\n" for r in log).encode())
    return out
