"""Pictures of what each method decided, for one batch row: `vlmfix.viz.plot(session, row=0)`.

```python
with vlmfix.apply(model, vlmfix.GIFT(), vlmfix.VAR(), tokenizer=processor, record=True) as session:
    session.generate(**inputs, max_new_tokens=32)
figure = session.plot(row=0, images=[picture])   # or vlmfix.viz.plot(session, row=0, images=[picture])
figure.save("row0.png")                            # PNG, SVG or PDF
```

The figure has one panel per image-token map and image grid (`vlmfix.viz.patches` places each token on its
image: LLaVA's square grid, LLaVA-NeXT's / OneVision's base view and tiles with a strip for the newline
tokens, Qwen's / GLM's / Mistral 3's merged patches, InternVL's / Aya Vision's / Idefics3's tiles and their
thumbnail or global image, PaliGemma's / Gemma 3's square grids, Gemma 4's pooled patches, FastVLM's feature
map, PerceptionLM's, Step 3.7's and Molmo2's views, Apertus 1.5's VQ codes), one per layer x head
map, and one per contrast trace (`record=True`); see `vlmfix.viz.panels` for what each shows. Matplotlib is needed
(`pip install vlmfix[viz]`); the figure is drawn with the Agg canvas, without pyplot, so it works headless
and leaves pyplot's state alone.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from vlmfix.decoding.prompt_inputs import image_layout
from vlmfix.viz.panels import HeadMap, ImageMap, TokenTrace, head_maps, image_maps, token_traces
from vlmfix.viz.patches import RowLayout, TokenGrid, row_layouts

__all__ = ["plot", "plot_report", "row_layouts", "image_maps", "head_maps", "token_traces", "RowLayout",
           "TokenGrid", "ImageMap", "HeadMap", "TokenTrace"]

SAVE_SUFFIXES = (".png", ".svg", ".pdf")
PANEL_INCHES = 3.0


def _matplotlib() -> Any:
    try:
        from matplotlib.figure import Figure
    except ImportError as error:
        raise ImportError("vlmfix.viz draws with matplotlib: pip install 'vlmfix[viz]' (or matplotlib).") from error
    return Figure


def _pictures_class() -> type:
    Figure = _matplotlib()

    class Pictures(Figure):  # type: ignore[misc, valid-type]
        """A matplotlib figure with `save(path)`."""

        def save(self, path: str | Path, **savefig: Any) -> Path:
            """Write the figure to `path` (.png, .svg or .pdf); returns the path."""
            path = Path(path)
            if path.suffix.lower() not in SAVE_SUFFIXES:
                raise ValueError(f"save writes {', '.join(SAVE_SUFFIXES)} files, got {path.name!r}; pick one of "
                                 f"these suffixes.")
            path.parent.mkdir(parents=True, exist_ok=True)
            self.savefig(path, bbox_inches="tight", **savefig)
            return path

    return Pictures


def plot(session: Any, row: int = 0, images: Any = None, inputs: Mapping[str, Any] | None = None,
         **options: Any) -> Any:
    """The pictures of batch row `row` of the session's last prompt batch (a figure with `save(path)`).

    Args:
        session: a `vlmfix.apply` session after `generate` (methods run with `record=True` add PAI's gain and
            the contrast traces).
        row: the batch row.
        images: the row's picture(s) (PIL images or [height, width, 3] arrays, prompt order), drawn under the
            maps; None draws the maps alone.
        inputs: the processor's output for the call, needed only after a bare `model.generate` inside
            `vlmfix.apply` (its image inputs, `image_sizes` / `image_grid_thw` / ..., never reach the session);
            `session.generate` records them itself.
        options: passed to `plot_report` (`tokens_per_panel`).
    """
    tokenizer = getattr(session, "tokenizer", None)
    prompt = dict(session.prompt_record())
    prompt.update(image_layout(inputs or {}))
    return plot_report(session.report(), prompt, session.model.config, row=row, images=images,
                       tokenizer=tokenizer, **options)


def plot_report(report: Mapping[str, Any], prompt: Mapping[str, Any], config: Any, row: int = 0,
                images: Any = None, tokenizer: Any = None, tokens_per_panel: int = 64) -> Any:
    """`plot` from plain data: `report` (`session.report()`), `prompt` (`session.prompt_record()`) and the
    model's config (its vision grid sizes)."""
    positions = prompt["image_positions"]
    if not isinstance(row, int) or isinstance(row, bool) or not 0 <= row < len(positions):
        raise ValueError(f"`row` must be a batch row in 0 .. {len(positions) - 1}, got {row!r}.")
    listed = None if images is None else [_array(image) for image in
                                          (images if isinstance(images, (list, tuple)) else [images])]
    per_prompt = prompt.get("rows_per_prompt", 1)
    shapes = None if listed is None else {row - row % per_prompt: [p.shape[:2] for p in listed]}
    layouts = row_layouts(prompt["family"], config, [len(p) for p in positions],
                          image_sizes=prompt.get("image_sizes"), image_grid_thw=prompt.get("image_grid_thw"),
                          image_patch_grids=prompt.get("image_patch_grids"),
                          image_merge_sizes=prompt.get("image_merge_sizes"), rows_per_prompt=per_prompt,
                          image_positions=positions,
                          image_run_tokens=prompt.get("image_run_tokens"), tokenizer=tokenizer, image_shapes=shapes,
                          rows={row - row % per_prompt})
    layout = layouts[row]
    pictures = _pictures(listed, layout.images)
    maps, heads, traces = image_maps(report, positions[row], row), head_maps(report, row), token_traces(report, row)
    per_map = len(layout.grids) + len(layout.newlines)  # panels of one image-token map
    gridless = [m.name for m in maps] if per_map == 0 else []
    if gridless:  # the row has no image token on a picture: its image-token maps have no panel to fill
        maps = []
    columns = max(per_map, 2)
    maps_per_row = max(1, columns // max(per_map, 1))  # one image's maps share a row
    map_rows = -(-len(maps) // maps_per_row)
    panel_rows = map_rows + len(heads) + len(traces)
    if panel_rows == 0 and gridless:
        raise ValueError(f"nothing to draw for row {row}: it has {layout.count} image tokens on no image grid, so "
                         f"its image-token maps ({', '.join(gridless)}) have no panel, and the report has no head "
                         f"map or contrast trace for it; pick a row with an image.")
    if panel_rows == 0:
        raise ValueError(f"nothing to draw for row {row}: the report has no method with pictures (gift, "
                         f"dual_stream, sid, avisc, var, pai, vhr, or a contrastive method run with record=True); "
                         f"it has {', '.join(report) or 'no method'}.")
    figure = _pictures_class()(figsize=(PANEL_INCHES * columns + 1, PANEL_INCHES * panel_rows), layout="constrained")
    grid = figure.add_gridspec(panel_rows, columns)
    for k, image_map in enumerate(maps):
        _draw_image_map(figure, grid, k // maps_per_row, (k % maps_per_row) * per_map, image_map, layout, pictures)
    at = map_rows
    for head_map in heads:
        _draw_head_map(figure.add_subplot(grid[at, :]), head_map)
        at += 1
    for trace in traces:
        _draw_trace(figure.add_subplot(grid[at, :]), trace, tokenizer, tokens_per_panel)
        at += 1
    figure.suptitle(f"row {row}")
    return figure


def _array(image: Any) -> np.ndarray:
    return np.asarray(image.convert("RGB") if hasattr(image, "convert") else image)


def _pictures(listed: list[np.ndarray] | None, count: int) -> list[np.ndarray | None]:
    if listed is None:
        return [None] * count
    if len(listed) != count:
        raise ValueError(f"the row has {count} image(s) but `images` holds {len(listed)}; pass the row's pictures "
                         f"in prompt order, or images=None.")
    return list(listed)


def _scale(panel: ImageMap | HeadMap) -> dict[str, Any]:
    if panel.binary:
        return {"cmap": "coolwarm", "vmin": 0.0, "vmax": 1.0}
    return {"cmap": "viridis", "vmin": 0.0, "vmax": 1.0} if panel.unit else {"cmap": "viridis"}


def _draw_image_map(figure: Any, grid: Any, at: int, first_column: int, image_map: ImageMap, layout: RowLayout,
                    pictures: Sequence[np.ndarray | None]) -> None:
    panels: list[TokenGrid | int] = []  # each image's grids, then its newline strip (an image index)
    for image in sorted({g.image for g in layout.grids}):
        panels.extend(g for g in layout.grids if g.image == image)
        if image in layout.newlines:
            panels.append(image)
    for column, panel in enumerate(panels, start=first_column):
        ax = figure.add_subplot(grid[at, column])
        if isinstance(panel, int):
            ax.imshow(image_map.values[layout.newlines[panel]][:, None], aspect="auto", interpolation="nearest",
                      **_scale(image_map))
            ax.set_title(f"image {panel} newline tokens", fontsize=8)
            ax.set_gid(f"{image_map.name}:{panel}:newlines")
            ax.set_xticks([])
            continue
        picture = pictures[panel.image]
        if picture is not None:
            top, left, height, width = panel.crop(picture.shape[0], picture.shape[1])
            picture = picture[top : top + height, left : left + width]
        height, width = (picture.shape[0], picture.shape[1]) if picture is not None else panel.shape
        if picture is not None:
            ax.imshow(picture, extent=(0, width, height, 0))
        extent = panel.extent(height, width) if picture is not None else (0, width, height, 0)  # cells alone
        shown = ax.imshow(panel.values(image_map.values), extent=extent,
                          alpha=0.6 if picture is not None else 1.0, interpolation="nearest",
                          **_scale(image_map))
        ax.set_title(f"{image_map.title}\nimage {panel.image} {panel.kind}", fontsize=8)
        ax.set_gid(f"{image_map.name}:{panel.image}:{panel.kind}")
        ax.set_xticks([])
        ax.set_yticks([])
        figure.colorbar(shown, ax=ax, fraction=0.046)


def _draw_head_map(ax: Any, head_map: HeadMap) -> None:
    shown = ax.imshow(head_map.values, aspect="auto", interpolation="nearest", **_scale(head_map))
    ax.set_title(head_map.title, fontsize=9)
    ax.set_gid(head_map.name)
    ax.set_yticks(range(len(head_map.layers)), [str(k) for k in head_map.layers])
    ax.set_xticks(range(head_map.values.shape[1]))
    ax.set_ylabel("layer")
    ax.set_xlabel("head")
    ax.figure.colorbar(shown, ax=ax, fraction=0.03)


def _draw_trace(ax: Any, trace: TokenTrace, tokenizer: Any, tokens_per_panel: int) -> None:
    steps = np.arange(len(trace.tokens))[:tokens_per_panel]
    n = len(steps)
    ax.plot(steps, trace.chosen_positive[:n], "o-", label="chosen token, positive stream", gid="chosen_positive")
    ax.plot(steps, trace.chosen_negative[:n], "o--", label="chosen token, negative stream", gid="chosen_negative")
    ax.plot(steps, trace.greedy_positive[:n], "x-", label="greedy token, positive stream", gid="greedy_positive")
    ax.plot(steps, trace.greedy_negative[:n], "x--", label="greedy token, negative stream", gid="greedy_negative")
    for t in trace.flipped:
        if t < n:
            ax.axvline(t, color="red", alpha=0.2)
    if tokenizer is not None:
        ax.set_xticks(steps, [tokenizer.decode([tok]) for tok in trace.tokens[:n]], rotation=90, fontsize=7)
    ax.set_xlabel("generated token (red: the contrast changed the greedy choice)")
    ax.set_ylabel("log-probability")
    ax.set_title(f"{trace.method}: both streams' log-probabilities", fontsize=9)
    ax.set_gid(f"{trace.method}.trace")
    ax.legend(fontsize=7, loc="lower left")
