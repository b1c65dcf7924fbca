"""What ``dp-eval`` writes: metrics, per-episode records, videos, a contact sheet and report.md.

    rollouts/<task>/<run>/
      metrics.json      success rate with its 95% Wilson interval, mean max reward, lengths,
                        inference latency p50/p99, checkpoint, seeds
      episodes.jsonl    one record per episode (seed, success, max reward, length, final info, ...)
      videos/episode_NNNN.mp4   the first K episodes, step and reward drawn on every frame
      frames/episode_NNNN.png   every episode's final frame
      contact_sheet.png the final frames side by side, green border = success, red = failure
      rewards.png       max reward so far against the step, every episode and their mean
      success_blocks.png success rate per block of consecutive seeds
      report.md         the table and the pictures

Plots are drawn with numpy and PIL only (matplotlib is not a dependency); text uses PIL's built-in
default font, so no font file is needed.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

Z95 = 1.959963984540054  # standard normal quantile for a two-sided 95% interval


def wilson_interval(successes: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion (Wilson 1927; Brown, Cai & DasGupta 2001).

    Unlike the normal approximation it stays within [0, 1] and is not empty at 0 or n successes,
    which is what small evaluations produce.
    """
    if n <= 0:
        return 0.0, 1.0
    p = successes / n
    denom = 1.0 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z / denom * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def jsonable(v):
    """Numpy scalars and arrays (and nested containers) as plain JSON values."""
    if isinstance(v, dict):
        return {str(k): jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [jsonable(x) for x in v]
    if isinstance(v, np.ndarray):
        return v.tolist() if v.size <= 64 else f"<array {v.shape} {v.dtype}>"
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    return str(v)


def compute_metrics(records: list, latencies_ms: list, meta: dict) -> dict:
    """Aggregate per-episode records into the metrics of metrics.json."""
    n = len(records)
    succ = int(sum(r["success"] for r in records))
    lo, hi = wilson_interval(succ, n)
    lat = np.asarray(latencies_ms, dtype=np.float64)
    return {
        "success_rate": succ / n if n else 0.0,
        "success_ci": [lo, hi],
        "successes": succ,
        "episodes": n,
        "mean_max_reward": float(np.mean([r["max_reward"] for r in records])) if n else 0.0,
        "mean_return": float(np.mean([r["return"] for r in records])) if n else 0.0,
        "mean_episode_length": float(np.mean([r["length"] for r in records])) if n else 0.0,
        "latency_p50_ms": float(np.percentile(lat, 50)) if lat.size else None,
        "latency_p99_ms": float(np.percentile(lat, 99)) if lat.size else None,
        "latency_mean_ms": float(lat.mean()) if lat.size else None,
        "predict_calls": int(lat.size),
        "seeds": [r["seed"] for r in records],
        **meta,
    }


def summary_line(m: dict) -> str:
    lo, hi = m["success_ci"]
    lat = f", p50 {m['latency_p50_ms']:.1f} ms/call" if m.get("latency_p50_ms") is not None else ""
    return (f"{m['task']} {m['label']}: success {m['success_rate']:.3f} [{lo:.3f}, {hi:.3f}] over "
            f"{m['episodes']} episodes, mean max reward {m['mean_max_reward']:.3f}, mean length "
            f"{m['mean_episode_length']:.1f}{lat}")


# ------------------------------------------------------------------------------- images
_FONT = None


def _font():
    global _FONT
    if _FONT is None:
        _FONT = ImageFont.load_default()
    return _FONT


def _upscale(img: np.ndarray, min_side: int = 256) -> np.ndarray:
    """Nearest-neighbour upscale by an integer factor so small renders (96 px) stay legible."""
    f = max(1, math.ceil(min_side / max(1, min(img.shape[:2]))))
    return img.repeat(f, 0).repeat(f, 1) if f > 1 else img


def annotate(img: np.ndarray, text: str) -> np.ndarray:
    """Draw ``text`` on a dark box in the top-left corner of an RGB uint8 image."""
    pil = Image.fromarray(np.ascontiguousarray(img[..., :3]).astype(np.uint8))
    draw = ImageDraw.Draw(pil)
    x0, y0, x1, y1 = draw.textbbox((4, 3), text, font=_font())
    draw.rectangle((x0 - 3, y0 - 2, x1 + 3, y1 + 2), fill=(0, 0, 0))
    draw.text((4, 3), text, fill=(255, 255, 255), font=_font())
    return np.asarray(pil)


def write_png(path: Path, img: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(img, dtype=np.uint8)).save(path)


def write_video(path: Path, frames: list, fps: float) -> None:
    """MP4 (H.264 through imageio-ffmpeg) of ``frames`` = [(rgb, step, reward)], annotated."""
    import imageio.v2 as imageio

    try:
        import imageio_ffmpeg  # noqa: F401  (without it imageio picks another writer for .mp4)
    except ImportError as e:
        raise RuntimeError(f"cannot write {path.name}: imageio-ffmpeg is not installed "
                           f"(pip install imageio-ffmpeg, or videos=0)") from e
    path.parent.mkdir(parents=True, exist_ok=True)
    # yuv420p needs even sides; macro_block_size=2 pads at most one pixel instead of resizing
    with imageio.get_writer(path, format="FFMPEG", fps=fps, codec="libx264", macro_block_size=2,
                            ffmpeg_log_level="error") as w:
        for img, step, reward in frames:
            w.append_data(annotate(_upscale(img), f"step {step}  reward {reward:.3f}"))


def contact_sheet(images: list, labels: list, ok: list, cols: int = 10, tile: int = 128) -> np.ndarray:
    """Grid of final frames, each with a label and a green (success) or red (failure) border."""
    rows = max(1, math.ceil(len(images) / cols))
    cols = min(cols, max(1, len(images)))
    pad = 4
    sheet = np.full((rows * (tile + pad) + pad, cols * (tile + pad) + pad, 3), 255, np.uint8)
    for k, (img, label, good) in enumerate(zip(images, labels, ok)):
        pil = Image.fromarray(np.asarray(img, np.uint8)[..., :3]).resize((tile, tile), Image.NEAREST)
        t = annotate(np.asarray(pil), label)
        r, c = divmod(k, cols)
        y, x = pad + r * (tile + pad), pad + c * (tile + pad)
        sheet[y - 2:y + tile + 2, x - 2:x + tile + 2] = (40, 170, 60) if good else (210, 50, 40)
        sheet[y:y + tile, x:x + tile] = t
    return sheet


# ------------------------------------------------------------------------------- plots
def _plot(series: list, title: str, ylim=(0.0, 1.0), bars: bool = False, xlabel: str = "",
          size=(640, 360), colors=None) -> np.ndarray:
    """A minimal line or bar chart: ``series`` is a list of 1-D arrays (bars: one array)."""
    w, h = size
    left, right, top, bottom = 48, 12, 28, 34
    pil = Image.new("RGB", size, (255, 255, 255))
    d = ImageDraw.Draw(pil)
    pw, ph = w - left - right, h - top - bottom
    lo, hi = ylim
    n_x = max([len(s) for s in series] + [1])

    def xy(i, v):
        x = left + (pw * (i + 0.5) / n_x if bars else pw * i / max(1, n_x - 1))
        return x, top + ph * (1 - (float(np.clip(v, lo, hi)) - lo) / (hi - lo or 1))

    for frac in (0, 0.25, 0.5, 0.75, 1.0):  # grid and y ticks
        y = top + ph * (1 - frac)
        d.line((left, y, left + pw, y), fill=(225, 225, 225))
        d.text((4, y - 6), f"{lo + frac * (hi - lo):.2f}", fill=(60, 60, 60), font=_font())
    d.rectangle((left, top, left + pw, top + ph), outline=(0, 0, 0))
    d.text((left, 6), title, fill=(0, 0, 0), font=_font())
    d.text((left, h - 18), f"{xlabel} (0 .. {n_x - 1})" if xlabel else "", fill=(60, 60, 60),
           font=_font())
    if bars:
        bw = pw / n_x * 0.8
        for i, v in enumerate(series[0]):
            x, y = xy(i, v)
            d.rectangle((x - bw / 2, y, x + bw / 2, top + ph), fill=(70, 120, 200))
    else:
        for k, s in enumerate(series):
            color = colors[k] if colors else (150, 170, 210)
            pts = [xy(i, v) for i, v in enumerate(s)]
            if len(pts) > 1:
                d.line(pts, fill=color, width=2 if colors and k == len(series) - 1 else 1)
    return np.asarray(pil)


def reward_plot(records: list) -> np.ndarray:
    """Highest reward so far against the step, per episode (light) and averaged (dark).

    An ended episode keeps its final value, so the mean curve at step ``t`` is the mean max
    reward of episodes cut at ``t`` and ends at the reported ``mean_max_reward``.
    """
    curves = [np.maximum.accumulate(np.asarray(r["rewards"], float)) for r in records
              if r.get("rewards")] or [np.zeros(1)]
    n = max(len(c) for c in curves)
    stack = np.stack([np.pad(c, (0, n - len(c)), mode="edge") for c in curves])
    hi = max(1.0, float(stack.max()))
    colors = [(170, 190, 225)] * len(curves) + [(20, 40, 120)]
    return _plot(list(stack) + [stack.mean(0)], "max reward so far (episodes light, mean dark)",
                 ylim=(0.0, hi), xlabel="step", colors=colors)


def success_blocks(records: list, block: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """Success rate of consecutive blocks of ``block`` episodes (seeds), and the block starts."""
    s = np.array([r["success"] for r in records], float)
    starts = np.arange(0, len(s), block)
    return np.array([s[i:i + block].mean() for i in starts]), starts


# ------------------------------------------------------------------------------- the report
def write_all(out: Path, metrics: dict, records: list) -> None:
    """Write metrics.json, episodes.jsonl, the contact sheet, the plots and report.md."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(jsonable(metrics), indent=1) + "\n")
    with open(out / "episodes.jsonl", "w") as f:
        for r in records:
            f.write(json.dumps(jsonable(r)) + "\n")

    finals = [(r, out / "frames" / f"episode_{r['episode']:04d}.png") for r in records]
    finals = [(r, p) for r, p in finals if p.is_file()]
    if finals:
        sheet = contact_sheet([np.asarray(Image.open(p).convert("RGB")) for _, p in finals],
                              [f"{r['episode']} {'ok' if r['success'] else 'fail'}" for r, _ in finals],
                              [r["success"] for r, _ in finals])
        write_png(out / "contact_sheet.png", sheet)
    write_png(out / "rewards.png", reward_plot(records))
    block = max(1, min(10, math.ceil(len(records) / 5)))
    rates, starts = success_blocks(records, block)
    write_png(out / "success_blocks.png",
              _plot([rates], f"success rate per block of {block} consecutive seeds", bars=True,
                    xlabel="block"))
    (out / "report.md").write_text(_markdown(out, metrics, records, bool(finals), block, rates, starts))


def _fmt(v, spec=".3f"):
    return "n/a" if v is None else format(v, spec)


def _markdown(out: Path, m: dict, records: list, sheet: bool, block: int, rates, starts) -> str:
    lo, hi = m["success_ci"]
    seeds = m["seeds"]
    seed_txt = f"{seeds[0]} .. {seeds[-1]}" if seeds else "none"
    lines = [
        f"# Evaluation: {m['task']} / {m['label']}",
        "",
        f"Checkpoint `{m['checkpoint']}`, {m['episodes']} episodes, env seeds {seed_txt} "
        f"(EVAL_SEED_BASE {m['seed_base']} + seed {m['seed']} + episode), max "
        f"{m['max_episode_steps']} steps, {m['world_size']} rank(s) x {m['n_envs']} env(s) on "
        f"{m['device']}.",
        "",
        "| metric | value |",
        "| --- | --- |",
        f"| success rate | {m['success_rate']:.3f} ({m['successes']}/{m['episodes']}) |",
        f"| success 95% Wilson interval | [{lo:.3f}, {hi:.3f}] |",
        f"| mean max reward | {m['mean_max_reward']:.3f} |",
        f"| mean return | {m['mean_return']:.3f} |",
        f"| mean episode length | {m['mean_episode_length']:.1f} |",
        f"| inference latency p50 / p99 (ms per predict call) | {_fmt(m['latency_p50_ms'], '.1f')} / "
        f"{_fmt(m['latency_p99_ms'], '.1f')} ({m['predict_calls']} calls) |",
        f"| sampler steps | {m['num_inference_steps'] or 'policy default'} |",
        f"| smoothing | {m['smoothing']} |",
        f"| sampler generators | {'one per episode' if m.get('episode_generators', True) else 'shared'} |",
        "",
        "Success = the env's `info['success']` on any step; max reward = the episode's highest step "
        "reward (the Push-T convention of Chi et al.).",
        "",
        "![max reward so far per step](rewards.png)",
        "",
        "![success per seed block](success_blocks.png)",
        "",
        "| seed block | episodes | success rate |",
        "| --- | --- | --- |",
    ]
    for s, rate in zip(starts, rates):
        e = min(len(records), s + block)
        lines.append(f"| {seeds[s]} .. {seeds[e - 1]} | {e - s} | {rate:.2f} |")
    lines.append("")
    if sheet:
        lines += ["## Final frames", "", "![contact sheet](contact_sheet.png)", ""]
    # this run's videos only (a reused folder may hold older ones)
    videos = [out / "videos" / f"episode_{r['episode']:04d}.mp4" for r in records
              if r["episode"] < m.get("videos", 0)]
    videos = [v for v in videos if v.is_file()]
    if videos:
        lines += ["## Videos", ""] + [f"- [{v.stem}](videos/{v.name})" for v in videos] + [""]
    lines += ["## Episodes", "", "| episode | seed | success | max reward | length |",
              "| --- | --- | --- | --- | --- |"]
    for r in records:
        lines.append(f"| {r['episode']} | {r['seed']} | {'yes' if r['success'] else 'no'} | "
                     f"{r['max_reward']:.3f} | {r['length']} |")
    return "\n".join(lines) + "\n"
