"""The captioner web page: drop photos in, read what they show.

    streamlit run app.py                                  # the shipped model
    CAPTIONER_MODEL=runs/x/model streamlit run app.py     # any trained bundle

Thin by design: every photo goes through `Captioner`; this file only lays out widgets and results.
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import os
import re
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path

import streamlit as st

from captioner.bundle import CONFIG, BundleError
from captioner.captioner import Captioner, CaptionResult, default_model_path
from captioner.cli import OUTPUT_FIELDS
from captioner.decoding import METHODS
from captioner.encoder import EncoderError
from captioner.images import IMAGE_SUFFIXES

Photo = tuple[str, bytes]  # (file name shown to the user, file content)

# Browsers cannot display TIFF, so the uploader offers every other format the loader reads.
UPLOAD_TYPES = sorted(s.lstrip(".") for s in IMAGE_SUFFIXES - {".tif", ".tiff"})
METHOD_LABELS = {"beam": "Beam search", "greedy": "Greedy", "sample": "Sampling"}
BATCH_SIZE = 8  # photos per encoder pass: small enough for the progress bar to move
COLUMNS = 3
STYLE = """<style>
[data-testid="stMainBlockContainer"] {padding-top: 2.5rem}
[data-testid="stImage"] img {border-radius: 0.6rem}
[class*="st-key-result-"] h3 {font-size: 1.45rem; line-height: 1.3; padding-bottom: 0.25rem}
</style>"""


def slug(name: str) -> str:
    """`Red sun` -> `red-sun`: widget keys and file names."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


EXAMPLES = {p.stem.capitalize(): p for p in sorted((Path(__file__).parent / "data" / "examples").glob("*.jpg"))}
"""The example photos shipped in data/examples (see its README for their sources)."""


@st.cache_data(show_spinner=False)
def example_photo(name: str) -> bytes:
    """The example photo `name` as file bytes (read once per server)."""
    return EXAMPLES[name].read_bytes()


def resolve_model_dir(text: str) -> Path:
    """The bundle directory typed in the sidebar, or the default one (`$CAPTIONER_MODEL` or shipped)."""
    return Path(text.strip()).expanduser().resolve() if text.strip() else default_model_path().resolve()


@st.cache_resource(show_spinner="Loading the model…", max_entries=2)
def load_captioner(model_dir: str, version: float) -> Captioner:
    """One `Captioner` (decoder, encoder and feature cache) per bundle for the whole server.

    `version` is the bundle's config time stamp: a model retrained into the same folder loads afresh.
    """
    return Captioner.load(model_dir)


def bundle_version(model_dir: Path) -> float:
    """When the bundle's config was written (0 if it has none)."""
    try:
        return (model_dir / CONFIG).stat().st_mtime
    except OSError:
        return 0.0  # let Captioner.load word the problem


def caption_photos(captioner: Captioner, photos: Sequence[Photo], settings: dict,
                   on_progress: Callable[[int, int], None] | None = None) -> list[CaptionResult]:
    """Caption uploaded files; one result per photo, in order, named as the user named it.

    The bytes go through files so the package's loader does every check (corrupt, not an image,
    too large, no pixels) and the feature cache can key them by content.
    """
    results: list[CaptionResult] = []
    with tempfile.TemporaryDirectory(prefix="captioner-app-") as tmp:
        paths = []
        for i, (_, data) in enumerate(photos):
            path = Path(tmp) / f"{i:05d}"  # the user's name may hold anything; Pillow reads the content
            path.write_bytes(data)
            paths.append(str(path))
        for result in captioner.iter_captions(paths, batch_size=BATCH_SIZE, **settings):
            results.append(replace(result, source=photos[len(results)][0]))
            if on_progress:
                on_progress(len(results), len(photos))
    return results


def decode_settings(method: str, beam_size: int, max_len: int, temperature: float, seed: int) -> dict:
    """`Captioner` options for the sidebar's choices; only those the method uses, so changing a
    disabled control re-captions nothing."""
    settings: dict = {"method": method, "max_len": max_len}
    if method == "beam":
        settings.update(beam_size=beam_size, num_results=beam_size)
    elif method == "sample":
        settings.update(temperature=temperature, seed=seed)
    return settings


def describe_settings(settings: dict) -> str:
    """How the captions were decoded, in words."""
    if settings["method"] == "beam":
        return f"beam search, width {settings['beam_size']}"
    if settings["method"] == "sample":
        return f"sampled at temperature {settings['temperature']:g}, seed {settings['seed']}"
    return "greedy"


def results_csv(results: Sequence[CaptionResult]) -> str:
    """One row per photo, in the columns `captioner caption -o x.csv` writes."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(OUTPUT_FIELDS)
    for r in results:
        log_prob = "" if r.log_prob is None else round(r.log_prob, 4)
        writer.writerow([r.source, r.caption or "", log_prob, r.error or ""])
    return buffer.getvalue()


def results_json(results: Sequence[CaptionResult], model: str, settings: dict) -> str:
    """Every caption with its beams, plus the model and settings that produced them."""
    rows = [
        {
            "image": r.source,
            "caption": r.caption,
            "log_prob": None if r.log_prob is None else round(r.log_prob, 4),
            "beams": [{"caption": text, "log_prob": round(lp, 4)} for text, lp in r.beams],
            "error": r.error,
        }
        for r in results
    ]
    return json.dumps({"model": model, "settings": settings, "captions": rows}, indent=2, ensure_ascii=False)


def sentence(caption: str) -> str:
    """`a red circle` -> `A red circle.`: the model writes lower-case tokens."""
    return caption[:1].upper() + caption[1:] + "."


def show_missing_model(error: Exception, typed: bool) -> None:
    """What to do when there is no model, instead of a traceback; `typed`: the user named the folder."""
    if typed:
        st.error(f"Could not load that model bundle. {error}", icon=":material/folder_off:")
    else:
        st.warning(f"No caption model could be loaded. {error}", icon=":material/explore:")
    st.markdown(
        "A model bundle is the `model` folder that `captioner train` writes. Train a small demo model "
        "on generated pictures of shapes in about a minute, or the full model on "
        "Flickr8k (see the README; hours on a CPU):"
    )
    st.code(
        "python -m captioner make-shapes data/shapes\n"
        "captioner train --data data/shapes --output runs/x --preset tiny --encoder tiny\n\n"
        "captioner train --data path/to/Flickr8k --output runs/flickr8k",
        language="bash",
    )
    st.markdown(
        "Then type `runs/x/model` under **Model bundle** in the sidebar, or start the page with "
        "`CAPTIONER_MODEL=runs/x/model streamlit run app.py` "
        "(on the command line: `captioner caption --model runs/x/model photo.jpg`)."
    )


def model_summary(captioner: Captioner) -> str:
    """One line about the loaded model: encoder, vocabulary, training data, dev score."""
    info, bundle = captioner.bundle.info, captioner.bundle
    parts = [f"encoder **{bundle.encoder['name']}**", f"{len(bundle.vocab):,} words"]
    if trained_on := (info.get("dataset") or {}).get("train_images"):
        parts.append(f"trained on {trained_on:,} photos")
    if (bleu4 := (info.get("best") or {}).get("val_bleu4")) is not None:
        parts.append(f"dev BLEU-4 {bleu4:.1f} (greedy)")
    return " · ".join(parts)


def sidebar_settings(captioner: Captioner) -> dict:
    """The decoding controls, starting from the bundle's own defaults."""
    defaults = captioner.options()
    st.markdown("##### Decoding")
    method = st.radio("Method", METHODS, index=METHODS.index(defaults.method), format_func=METHOD_LABELS.get,
                      key="method",
                      help="Beam search keeps the best few partial sentences at each word; greedy keeps one; "
                      "sampling draws each word at random, so it can surprise you.")
    beam_size = st.slider("Beam width", 1, max(10, defaults.beam_size), defaults.beam_size, key="beam_size",
                          disabled=method != "beam", help="How many sentences beam search keeps (and shows).")
    max_len = st.slider("Max length (words)", 3, max(50, defaults.max_len), defaults.max_len, key="max_len")
    temperature = st.slider("Temperature", 0.1, 2.0, float(defaults.temperature), 0.1, key="temperature",
                            disabled=method != "sample", help="Below 1: safer words; above 1: wilder ones.")
    seed = st.number_input("Seed", 0, 2**31 - 1, 0, key="seed", disabled=method != "sample",
                           help="Same seed, same sample; change it for another.")
    return decode_settings(method, beam_size, max_len, temperature, int(seed))


def chosen_photos(uploads: Sequence) -> list[Photo]:
    """Uploaded files, then ticked examples."""
    photos = [(u.name, u.getvalue()) for u in uploads]
    with st.expander("No photo at hand? Try an example", expanded=not uploads, icon=":material/palette:"):
        for column, name in zip(st.columns(len(EXAMPLES)), EXAMPLES):
            with column:
                st.image(example_photo(name), width="stretch")
                if st.checkbox(name, key=f"example-{slug(name)}"):
                    photos.append((EXAMPLES[name].name, example_photo(name)))
    return photos


def captions_for(captioner: Captioner, model_key: str, photos: Sequence[Photo], settings: dict) -> list[CaptionResult]:
    """Results for `photos`, captioning only those not yet done with these settings.

    Streamlit reruns the page on every click; remembering results per (settings, content) keeps
    ticking an example from re-decoding the rest. A settings change re-decodes every photo, and
    Captioner's feature cache spares the encoder.
    """
    settings_id = json.dumps([model_key, settings], sort_keys=True)
    keys = [(settings_id, hashlib.sha256(data).hexdigest()) for _, data in photos]
    memo: dict = st.session_state.get("captions", {})
    todo = [i for i, key in enumerate(keys) if key not in memo]
    if todo:
        bar = st.progress(0.0, text=f"Captioning {len(todo)} photo{'s' * (len(todo) > 1)}…")
        done = caption_photos(
            captioner, [photos[i] for i in todo], settings,
            lambda n, total: bar.progress(n / total, text=f"Captioned {n} of {total}…"),
        )
        memo.update(zip((keys[i] for i in todo), done))
        bar.empty()
    st.session_state["captions"] = {key: memo[key] for key in keys}  # forget photos no longer shown
    return [replace(memo[key], source=name) for key, (name, _) in zip(keys, photos)]


def show_result(photo: Photo, result: CaptionResult, settings: dict) -> None:
    """One photo's card: the picture, its caption in large type, the beams on request; or its error."""
    name, data = photo
    if not result.ok:
        st.error(f"**{name}** could not be captioned: {result.error}", icon=":material/broken_image:")
        return
    st.image(data, width="stretch")
    st.subheader(sentence(result.caption), anchor=False)
    st.caption(f"{name} · {describe_settings(settings)} · log-prob {result.log_prob:.2f}")
    if len(result.beams) > 1:
        with st.expander(f"Top {len(result.beams)} beams"):
            st.markdown("\n".join(beam_line(rank, text, lp) for rank, (text, lp) in enumerate(result.beams, 1)))


def beam_line(rank: int, text: str, log_prob: float) -> str:
    """One markdown list line: the sentence, then its log-probability and probability in grey."""
    return f"{rank}. {text} :gray[· log-prob {log_prob:.2f} · p {math.exp(log_prob):.0%}]"


def main() -> None:
    st.set_page_config(page_title="Captioner", page_icon=":material/photo_camera:", layout="wide")
    st.markdown(STYLE, unsafe_allow_html=True)
    st.title(":material/photo_camera: Captioner", anchor=False)
    st.markdown(
        "Drop in photos and read what a neural network sees in them. A frozen ImageNet CNN turns each "
        "photo into one vector; an LSTM, trained on captioned photos, writes the sentence word by word "
        "(*Show and Tell*, Vinyals et al., 2015)."
    )

    st.sidebar.header(":material/tune: Settings", anchor=False)
    default = "$CAPTIONER_MODEL" if os.environ.get("CAPTIONER_MODEL") else "the shipped model"
    typed = st.sidebar.text_input("Model bundle", key="model_dir", placeholder=f"default: {default}",
                                  help="A folder written by `captioner train` (e.g. `runs/x/model`). "
                                  "Empty: the shipped model, or `$CAPTIONER_MODEL` if set.")
    model_dir = resolve_model_dir(typed)
    model_key = f"{model_dir}@{bundle_version(model_dir)}"
    try:
        captioner = load_captioner(str(model_dir), bundle_version(model_dir))
    except (BundleError, EncoderError) as e:
        show_missing_model(e, typed=bool(typed.strip()))
        return
    with st.sidebar:
        st.caption(model_summary(captioner))
        settings = sidebar_settings(captioner)

    uploads = st.file_uploader("Your photos", type=UPLOAD_TYPES, accept_multiple_files=True, key="uploads",
                               help="Several at once is fine. Animated GIFs are captioned by their first frame.")
    photos = chosen_photos(uploads or [])
    if not photos:
        st.info("Add a photo above, or tick an example, to see its caption.", icon=":material/arrow_upward:")
        return

    results = captions_for(captioner, model_key, photos, settings)
    failed = sum(not r.ok for r in results)
    summary, csv_column, json_column = st.columns([4, 1, 1], vertical_alignment="center")
    summary.markdown(f"**{len(results) - failed} of {len(results)} photo{'s' * (len(results) > 1)} captioned**"
                     + (f" · {failed} could not be read" if failed else ""))
    csv_column.download_button("CSV", results_csv(results), "captions.csv", "text/csv", on_click="ignore",
                               icon=":material/download:", width="stretch")
    json_column.download_button("JSON", results_json(results, str(model_dir), settings), "captions.json",
                                "application/json", on_click="ignore", icon=":material/download:", width="stretch")
    for start in range(0, len(photos), COLUMNS):
        for offset, column in enumerate(st.columns(COLUMNS)):
            i = start + offset
            if i < len(photos):
                with column.container(border=True, key=f"result-{i}"):
                    show_result(photos[i], results[i], settings)


if __name__ == "__main__":  # `streamlit run` executes the page as __main__; tests import the helpers
    main()
