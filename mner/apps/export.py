"""``mner export RUN --out DIR``: one seed of a run as a self-contained, shareable model folder.

The folder is a run folder holding a single seed, so everything that reads run folders
(:func:`mner.train.runs.load_run`, ``mner.load``, ``mner predict``, ``mner evaluate
--features``) reads it unchanged, on any machine::

    DIR/README.md            model card (Hugging Face format: YAML front matter, then text)
    DIR/config.yaml          the TrainConfig
    DIR/provenance.json      data and cache hashes, the extractor settings and vision-weight
                             records predict needs, precision, feature sizes
    DIR/metrics.json         the exported seed's record, and mean +- std over all seeds
    DIR/mner_export.json     what was exported from where (run name, seed, mner version)
    DIR/seed_<k>/            model.safetensors, labels.json, encoder/ (config + tokenizer)

No absolute path is written: data files and the cache are named by file name and
sha256, the extractors' ``weights_dir`` is dropped (on the other machine, tiny-profile
vision models are rebuilt from their seeds and paper-profile weights come from the
libraries' caches, as the card says), and any other string that is an absolute path
(e.g. a local encoder folder) is cut to its last component. The folder is written as ``DIR.partial`` and renamed when complete, under a
lock (``DIR.lock``) against a second writer.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import yaml

from mner.errors import ConfigError, DataError
from mner.locks import locked
from mner.train.runs import RunFolder

MARKER = "mner_export.json"


#: Keys of Hugging Face's config/tokenizer JSON files that record where they were loaded
#: from. Only these are rewritten there: a vocabulary holds tokens such as "/" or "~/".
HF_PATH_KEYS = ("_name_or_path", "name_or_path", "tokenizer_file", "vocab_file")


def _is_path(value: str) -> bool:
    """An absolute path of a file or folder (``/a/b``, ``~/a``), not a lone ``/`` or ``~``."""
    return (os.path.isabs(value) or value.startswith("~/")) and len(Path(value).parts) > 2


def _no_abs_paths(value: Any) -> Any:
    """``value`` with every absolute-path string (keys too) cut to its last component."""
    if isinstance(value, dict):
        return {_no_abs_paths(k): _no_abs_paths(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_no_abs_paths(v) for v in value]
    if isinstance(value, str) and _is_path(value):
        return Path(value).name
    return value


def _portable_hf_json(path: Path) -> None:
    """Rewrite the path-recording keys of a Hugging Face JSON file, when they hold a path."""
    data = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(data, dict):
        return
    found = {k: Path(v).name for k in HF_PATH_KEYS
             if isinstance(v := data.get(k), str) and _is_path(v)}
    if found:  # untouched files keep their bytes
        path.write_text(json.dumps({**data, **found}, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _portable_provenance(prov: dict) -> dict:
    """The run's provenance without anything that names this machine's files."""
    prov = json.loads(json.dumps(prov, default=str))
    ds = prov.get("dataset") or {}
    if isinstance(ds.get("files"), dict):
        ds["files"] = {Path(k).name: v for k, v in ds["files"].items()}
    cache = prov.get("cache") or {}
    if cache.get("path"):
        # The cache stays on the machine that trained; its name and sha256 identify it.
        cache["file"] = Path(str(cache["path"])).name
        cache["path"] = None
    ec = (cache.get("provenance") or {}).get("extract_config")
    if isinstance(ec, dict) and ec.get("weights_dir"):
        ec["weights_dir"] = None
    return _no_abs_paths(prov)


def _fmt(ms: dict | None, key: str = "f1") -> str:
    if not ms or not isinstance(ms.get(key), dict):
        return "n/a"
    return f"{ms[key]['mean']:.2f} ± {ms[key]['std']:.2f}"


def vision_weights(prov: dict, groups) -> list[str]:
    """One line per vision model the features in ``groups`` came from: name, source, hash."""
    cache_prov = (prov.get("cache") or {}).get("provenance") or {}
    lines = []
    for group in dict.fromkeys(groups):
        info = cache_prov.get(group)
        if not isinstance(info, dict):
            continue
        w = info.get("weights") if isinstance(info.get("weights"), dict) else {}
        name = w.get("name") or info.get("model") or "?"
        src = w.get("source") or w.get("tag") or "?"
        digest = w.get("sha256")
        lines.append(f"`{group}`: {name} ({src}" + (f", sha256 `{digest}`" if digest else "") + ")")
    return lines


def model_card(name: str, cfg, prov: dict, metrics: dict | None, seed: int) -> str:
    """The model card ``README.md``: Hugging Face YAML front matter, then the card's text."""
    from mner import __version__

    summary = (metrics or {}).get("summary") or {}
    test, dev = summary.get("test"), summary.get("dev")
    n_seeds = len((metrics or {}).get("all_seeds") or (metrics or {}).get("runs") or [])
    dataset = (prov.get("dataset") or {}).get("name") or "unknown"
    head_cls = cfg.head_class()
    front: dict[str, Any] = {
        "library_name": "mner",
        "tags": ["token-classification", "named-entity-recognition", "multimodal", "twitter", "mner", cfg.model],
        "datasets": [dataset],
        "metrics": ["f1", "precision", "recall"],
        "pipeline_tag": "token-classification",
    }
    if test and test.get("overall"):
        o = test["overall"]
        front["model-index"] = [{
            "name": name,
            "results": [{
                "task": {"type": "token-classification", "name": "Multimodal named entity recognition"},
                "dataset": {"type": dataset, "name": dataset, "split": "test"},
                "metrics": [
                    {"type": k, "value": round(o[k]["mean"], 2), "name": f"test {k} (mean of {n_seeds} seed{'s' if n_seeds != 1 else ''})"}
                    for k in ("f1", "precision", "recall") if isinstance(o.get(k), dict)
                ],
            }],
        }]
    files = (prov.get("dataset") or {}).get("files") or {}
    cache = prov.get("cache") or {}
    lines = ["---", yaml.safe_dump(front, sort_keys=False, allow_unicode=True).rstrip(), "---", "",
             f"# {name}", "",
             f"A multimodal named entity recognition model for tweets trained with mner {__version__}: "
             f"the `{cfg.model}` head ({head_cls.summary or cfg.model}) on the `{cfg.encoder}` text "
             f"encoder, with a CRF over words. Seed {seed} of the run (the best on dev unless chosen).", "",
             "## Model", "",
             f"- head: `{cfg.model}`; encoder: `{cfg.encoder}`; profile: `{cfg.profile}`; "
             f"tag scheme: `{cfg.scheme}`; max length {cfg.max_length} sub-tokens",
             f"- trained for up to {cfg.epochs} epochs, in {prov.get('precision', 'fp32')} precision",
             f"- image features read: {', '.join(cfg.head_class().required_features(cfg.head_config())) or 'none (text only)'}",
             "", "## Data", "",
             f"- dataset: `{dataset}`"]
    lines += [f"  - `{f}`: sha256 `{h}`" for f, h in sorted(files.items())]
    if cache.get("sha256"):
        lines.append(f"- feature cache: sha256 `{cache['sha256']}`")
    lines += ["", "## Metrics", "",
              f"Micro-averaged entity P/R/F1 (conlleval), mean ± std over {n_seeds} seed(s):", "",
              "| split | precision | recall | F1 | image-dependent F1 |", "|---|---|---|---|---|"]
    for split, rec in (("dev", dev), ("test", test)):
        if rec:
            lines.append(f"| {split} | {_fmt(rec.get('overall'), 'precision')} | "
                         f"{_fmt(rec.get('overall'), 'recall')} | {_fmt(rec.get('overall'))} | "
                         f"{_fmt(rec.get('image_dependent'))} |")
    lines += ["", "## How to use", "", "```python", "import mner", "",
              f'tagger = mner.load("{name}")', 'tagger("Kevin Durant visits Oakland", "photo.jpg")',
              "# [{'entity_group': 'PER', 'score': 0.98, 'word': 'Kevin Durant', 'start': 0, 'end': 12, ...}]",
              "```", "", f"or `mner predict --run {name} --input posts.jsonl --out predictions.jsonl`.",
              "", "## Intended use", "",
              "Tagging persons, locations, organisations and miscellaneous entities in English tweets "
              "with their attached image, for research on multimodal NER. Not evaluated on other domains "
              "or languages; predictions are not suitable for decisions about individuals.",
              "", "## Limitations", "",
              "- The image features are computed on the fly by the same vision models that made the "
              "training cache, and must be the same weights for the scores above to hold:"]
    needs = cfg.head_class().required_features(cfg.head_config())
    weights = vision_weights(prov, [n.split("/")[0] for n in needs])
    lines += [f"  - {w}" for w in weights] or ["  - none: this model reads no image features"]
    lines += ["- Paper-profile vision weights are not part of this folder: they come from the "
              "libraries' caches (torchvision, open_clip) on the machine that loads the model.",
              "- Trained on the data above only; entity types and tweet style outside it are not covered.",
              "- `score` is the CRF's marginal probability of the predicted span, a calibrated-looking "
              "number that is not calibrated on new domains.", ""]
    return "\n".join(lines)


def export_run(run: str | os.PathLike, out: str | os.PathLike, *, seed: int | None = None,
               overwrite: bool = False) -> Path:
    """Write one seed of ``run`` as a self-contained model folder ``out`` (see module doc).

    Args:
        run: the run folder (``mner train --out``).
        out: the folder to write.
        seed: which seed (default: the best on dev).
        overwrite: replace an existing ``out``.

    Returns:
        ``out``.

    Raises:
        ConfigError: not a trained run, or ``out`` exists without ``overwrite``.
        LockError: another process is writing ``out``.
    """
    src = RunFolder(Path(run))
    cfg = src.read_config()
    sf = src.best_seed(seed)
    k = int(sf.path.name.split("_", 1)[1])
    out = Path(out)
    if out.resolve() == src.root.resolve() or src.root.resolve() in out.resolve().parents:
        raise ConfigError(f"{out}: inside the run folder {src.root}; choose a folder elsewhere")
    with locked(out, folder=False, what="exported model"):
        if out.exists() and not overwrite:
            raise ConfigError(f"{out}: already exists; pass --overwrite to replace it, or choose another --out")
        tmp = out.with_name(out.name + ".partial")
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            dst = RunFolder(tmp)
            seed_dir = dst.seed(k).path
            seed_dir.mkdir(parents=True)
            shutil.copy2(sf.model, seed_dir / "model.safetensors")
            shutil.copy2(sf.labels, seed_dir / "labels.json")
            shutil.copytree(sf.encoder, seed_dir / "encoder")
            for f in (seed_dir / "encoder").rglob("*.json"):  # HF may record where it loaded from
                _portable_hf_json(f)
            from mner.config import to_dict

            dst.config.write_text(yaml.safe_dump(_no_abs_paths(to_dict(cfg)), sort_keys=False), encoding="utf-8")
            prov = _portable_provenance(src.read_provenance())
            dst.provenance.write_text(json.dumps(prov, indent=2) + "\n", encoding="utf-8")
            metrics = src.read_metrics()
            if metrics is not None:
                runs = metrics.get("runs") or []
                mine = [r for r in runs if r.get("seed") == k]
                metrics = _no_abs_paths({**metrics, "runs": mine, "all_seeds": runs})
                dst.metrics.write_text(json.dumps(metrics, indent=2) + "\n", encoding="utf-8")
            from mner import __version__

            (tmp / MARKER).write_text(json.dumps(
                {"format": 1, "run": src.root.name, "seed": k, "model": cfg.model, "mner_version": __version__},
                indent=2) + "\n", encoding="utf-8")
            (tmp / "README.md").write_text(model_card(out.name, cfg, prov, metrics, k), encoding="utf-8")
        except OSError as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            raise DataError(f"{tmp}: cannot write ({exc.strerror or exc}); free disk space or choose "
                            "another --out, then run again") from None
        # The sample generator's folder swap: the old folder is kept until the new one is in place.
        from mner.data.sample import _swap_into_place

        _swap_into_place(tmp, out)
    return out
