"""The captioner web page: drop photos in, read what they show.

    streamlit run app.py                                  # the shipped model
    CAPTIONER_MODEL=runs/x/model streamlit run app.py     # any trained bundle
    CAPTIONER_APP_MODELS="flickr8k=/srv/models/f8k,shapes=/srv/models/shapes" streamlit run app.py

By default the sidebar has a box for any model folder on this machine: right for local use.
A deployer sets `CAPTIONER_APP_MODELS` (name=folder pairs, comma-separated): visitors then pick
one of those names and can name no folder of the server.

Thin by design: every photo goes through `Captioner`; this file only lays out widgets and results.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path

import streamlit as st
from PIL import Image

from captioner import attention_maps, paths
from captioner.bundle import CONFIG, BundleError
from captioner.captioner import Captioner, CaptionResult
from captioner.decoding import METHODS, DecodeOptions
from captioner.errors import EncoderError
from captioner.output import results_csv, results_json

Photo = tuple[str, bytes]  # (file name shown to the user, file content)

ICON = Path(__file__).parent / "data" / "app-icon.png"  # a local file: the page fetches nothing from outside
# What one visitor may ask of the server, set here so it holds wherever the page is started from.
MAX_UPLOAD_MB = 25  # per file
MAX_PHOTO_PIXELS = 50_000_000  # per photo, refused from its header: a 48-megapixel phone photo passes
MAX_SESSION_PHOTOS = 48  # photos captioned per visit: with the per-photo limit, the session's pixel budget
METHOD_LABELS = {"beam": "Beam search", "greedy": "Greedy", "sample": "Sampling"}
BATCH_SIZE = 8  # photos per encoder pass: small enough for the progress bar to move
COLUMNS = 3
PREVIEW_SIDE = 720  # pixels: a card's heatmap is drawn over the photo shrunk to this (a card is narrower)
THUMB_SIDE = 120  # pixels: each word's picture in the strip under the caption, 3 to a row
STYLE = """<style>
[data-testid="stMainBlockContainer"] {padding-top: 2.5rem}
[data-testid="stImage"] img {border-radius: 0.6rem}
[class*="st-key-result-"] h3 {font-size: 1.45rem; line-height: 1.3; padding-bottom: 0.25rem}
</style>"""


def slug(name: str) -> str:
    """`Red sun` -> `red-sun`: widget keys and file names."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


# The example photos shipped in data/examples (see its README for their sources).
EXAMPLES = {p.stem.capitalize(): p for p in sorted((Path(__file__).parent / "data" / "examples").glob("*.jpg"))}


@st.cache_data(show_spinner=False)
def example_photo(name: str) -> bytes:
    """The example photo `name` as file bytes (read once per server)."""
    return EXAMPLES[name].read_bytes()


def named_models() -> dict[str, Path]:
    """The deployer's `CAPTIONER_APP_MODELS` ("name=folder,name=folder"; a folder may be a shipped
    model's name), or {} when unset."""
    pairs = [item.partition("=") for item in os.environ.get("CAPTIONER_APP_MODELS", "").split(",") if item.strip()]
    return {name.strip(): paths.model_dir(folder.strip()) for name, _, folder in pairs if name.strip() and folder.strip()}


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


def caption_photos(captioner: Captioner, photos: Sequence[Photo], options: DecodeOptions,
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
        for result in captioner.iter_captions(paths, options, batch_size=BATCH_SIZE, max_pixels=MAX_PHOTO_PIXELS):
            results.append(replace(result, source=photos[len(results)][0]))
            if on_progress:
                on_progress(len(results), len(photos))
    return results


def decode_settings(defaults: DecodeOptions, method: str, beam_size: int, max_len: int, temperature: float,
                    seed: int) -> DecodeOptions:
    """The sidebar's choices over the model's defaults; only those the method uses, so changing a
    disabled control re-captions nothing."""
    options = replace(defaults, method=method, max_len=max_len, num_results=1)
    if method == "beam":
        return replace(options, beam_size=beam_size, num_results=beam_size)
    if method == "sample":
        return replace(options, temperature=temperature, seed=seed)
    return options


def describe_settings(options: DecodeOptions) -> str:
    """How the captions were decoded, in words."""
    if options.method == "beam":
        return f"beam search, width {options.beam_size}"
    if options.method == "sample":
        return f"sampled at temperature {options.temperature:g}, seed {options.seed}"
    return "greedy"


def sentence(caption: str) -> str:
    """`a red circle` -> `A red circle.`: the model writes lower-case tokens."""
    return caption[:1].upper() + caption[1:] + "."


def show_missing_model(error: Exception | None) -> None:
    """What to do when there is no model, instead of a traceback. `error` is None for a folder a
    visitor chose: what went wrong there is not shown, so the page tells nothing about the server."""
    if error is None:
        st.error("No model bundle could be loaded from that folder. Check it on the command line "
                 "(`captioner caption --model FOLDER photo.jpg` says why).", icon=":material/folder_off:")
    else:
        st.warning(f"No caption model could be loaded. {error}", icon=":material/explore:")
    st.markdown(
        "A model bundle is the `model` folder that `captioner train` writes. Train a small demo model "
        "on generated pictures of shapes in about a minute, or the full model on "
        "Flickr8k (see the README; hours on a CPU):"
    )
    st.code(
        "captioner make-shapes data/shapes\n"
        "captioner train --data data/shapes --output runs/x --preset tiny --encoder tiny\n\n"
        "captioner train --data data/flickr8k --output runs/flickr8k",
        language="bash",
    )
    st.markdown(
        "Then type `runs/x/model` under **Model bundle** in the sidebar, or start the page with "
        "`CAPTIONER_MODEL=runs/x/model streamlit run app.py` "
        "(on the command line: `captioner caption --model runs/x/model photo.jpg`)."
    )


def runtime_name(captioner: Captioner) -> str:
    """`LiteRT (int8 encoder)`, `LiteRT` or `TensorFlow`: what runs the networks."""
    if captioner.runtime != "litert":
        return "TensorFlow"
    return "LiteRT (int8 encoder)" if getattr(captioner.encoder, "int8", False) else "LiteRT"


def model_summary(captioner: Captioner) -> str:
    """One line about the loaded model: encoder, vocabulary, training data, dev score, runtime."""
    info, bundle = captioner.bundle.info, captioner.bundle
    parts = [f"encoder **{bundle.encoder['name']}**", f"{len(bundle.vocab):,} words",
             f"runs on {runtime_name(captioner)}"]
    if captioner.grid_shape:
        parts.insert(1, "attends over {}×{} regions".format(*captioner.grid_shape))
    if bundle.members:
        parts.insert(1, f"ensemble of {len(bundle.members)} models")
    if trained_on := (info.get("dataset") or {}).get("train_images"):
        parts.append(f"trained on {trained_on:,} photos")
    if (bleu4 := (info.get("best") or {}).get("val_bleu4")) is not None:
        parts.append(f"dev BLEU-4 {bleu4:.1f} (greedy)")
    return " · ".join(parts)


def sidebar_settings(captioner: Captioner) -> DecodeOptions:
    """The decoding controls, starting from the bundle's own defaults."""
    defaults = captioner.options
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
    return decode_settings(defaults, method, beam_size, max_len, temperature, int(seed))


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


def captions_for(captioner: Captioner, model_key: str, photos: Sequence[Photo],
                 options: DecodeOptions) -> list[CaptionResult]:
    """Results for `photos`, captioning only those not yet done with these settings.

    Streamlit reruns the page on every click; remembering results per (settings, content) keeps
    ticking an example from re-decoding the rest. A settings change re-decodes every photo, and
    Captioner's feature cache spares the encoder.
    """
    settings_id = json.dumps([model_key, options.to_dict()], sort_keys=True)
    keys = [(settings_id, hashlib.sha256(data).hexdigest()) for _, data in photos]
    memo: dict = st.session_state.get("captions", {})
    todo = [i for i, key in enumerate(keys) if key not in memo]
    if todo:
        bar = st.progress(0.0, text=f"Captioning {len(todo)} photo{'s' * (len(todo) > 1)}…")
        started = time.perf_counter()
        done = caption_photos(
            captioner, [photos[i] for i in todo], options,
            lambda n, total: bar.progress(n / total, text=f"Captioned {n} of {total}…"),
        )
        # What this machine just took, shown in the sidebar: a measured figure, not a promise.
        st.session_state["last_timing"] = (len(todo), time.perf_counter() - started)
        memo.update(zip((keys[i] for i in todo), done))
        bar.empty()
    st.session_state["captions"] = {key: memo[key] for key in keys}  # forget photos no longer shown
    return [replace(memo[key], source=name) for key, (name, _) in zip(keys, photos)]


@st.cache_data(show_spinner=False, max_entries=64)
def photo_preview(data: bytes) -> Image.Image:
    """The photo upright and shrunk to draw attention over (decoded once per photo)."""
    return attention_maps.preview(data, PREVIEW_SIDE)


def show_result(photo: Photo, result: CaptionResult, options: DecodeOptions, key: str) -> None:
    """One photo's card: the picture, its caption in large type, where an attention model looked
    for each word, the beams on request; or its error."""
    name, data = photo
    if not result.ok:
        st.error(f"**{name}** could not be captioned: {result.error}", icon=":material/broken_image:")
        return
    picture = st.empty()  # filled below, once the chosen word is known
    st.subheader(sentence(result.caption), anchor=False)
    best = result.beams[0]
    st.caption(f"{name} · {describe_settings(options)} · {best.word_probability:.0%} per word",
               help=PER_WORD_HELP)
    show_recognition(result)
    word = None if result.attention is None else attention_words(data, result, key)
    if word is None:
        picture.image(data, width="stretch")
    else:
        picture.image(attention_maps.overlay(photo_preview(data), result.attention[word]), width="stretch",
                      caption=f"Where the model looked for “{result.caption.split()[word]}”")
    if len(result.beams) > 1:
        with st.expander(f"Top {len(result.beams)} beams"):
            st.markdown("\n".join(beam_line(rank, beam) for rank, beam in enumerate(result.beams, 1)))
            st.caption(PER_WORD_HELP)


def attention_words(data: bytes, result: CaptionResult, key: str) -> int | None:
    """The caption's words to pick from, and the strip of where the model looked for each;
    returns the picked word's position, or None."""
    words = result.caption.split()
    labels = word_labels(words)
    # The caption is part of the key: a new caption starts with no word picked.
    word = st.pills("Where did it look? Pick a word", list(range(len(words))), format_func=labels.__getitem__,
                    key=f"word-{key}-{slug(result.caption)}", help=ATTENTION_HELP)
    st.image(attention_maps.strip(photo_preview(data), words, result.attention, THUMB_SIDE, columns=3),
             width="stretch", caption="Every word: brighter where the model looked more")
    return word


def word_labels(words: Sequence[str]) -> list[str]:
    """The words as distinct labels: Streamlit tells options apart by label, so a repeated word
    ("a ... a ...") gets zero-width spaces, one more each time, and looks the same."""
    return [word + "\u200b" * words[:i].count(word) for i, word in enumerate(words)]


ATTENTION_HELP = ("While writing each word, the model weighs the regions of the photo's feature map; the "
                  "heatmap shows those weights, brightest where it looked most for that word.")
PER_WORD_HELP = ("How sure the model was, per word: the geometric mean of the probabilities it gave each "
                 "word of the sentence (and its end). Beams are ranked by log-probability over length^α.")


UNFAMILIAR_WARNING = ("This photo looks unlike the photos this model learned from, so the caption may well be "
                      "wrong: the model can only describe the kinds of scenes it was trained on.")
RECOGNITION_HELP = ("What the encoder, an ImageNet classifier, recognises in the photo (its top labels), and how "
                    "close the photo lies to the model's training photos (1: as close as can be). The threshold "
                    "is set so that most held-out photos of the training collection reach it (95 % by default).")


def show_recognition(result: CaptionResult) -> None:
    """The encoder's top ImageNet labels and the photo's familiarity, with a plain-words warning
    when the photo is unlike the model's training photos (either may be missing for a model)."""
    if result.unfamiliar:
        st.warning(UNFAMILIAR_WARNING, icon=":material/travel_explore:")
    parts = []
    if result.labels:
        parts.append("looks like " + ", ".join(f"{name} {p:.0%}" for name, p in result.labels[:3]))
    if result.familiarity is not None:
        parts.append(f"familiarity {result.familiarity:.2f} (threshold {result.familiarity_threshold:.2f})")
    if parts:
        st.caption(" · ".join(parts), help=RECOGNITION_HELP)


def beam_line(rank: int, beam) -> str:
    """One markdown list line: the sentence, then how sure the model was of its words, in grey."""
    return f"{rank}. {beam.caption} :gray[· {beam.word_probability:.0%} per word · log-prob {beam.log_prob:.2f}]"


def choose_model() -> tuple[Path, bool]:
    """The bundle folder to load, and whether a visitor chose it (then errors say nothing about it)."""
    named = named_models()
    if named:  # deployed: the visitor picks a name and never sees or types a path
        name = st.sidebar.selectbox("Model", list(named), key="model_name")
        return named[name], True
    default = "$CAPTIONER_MODEL" if os.environ.get("CAPTIONER_MODEL") else "the shipped model"
    typed = st.sidebar.text_input("Model bundle", key="model_dir", placeholder=f"default: {default}",
                                  help="A folder written by `captioner train` (e.g. `runs/x/model`) or a shipped model's name. "
                                  "Empty: the shipped model, or `$CAPTIONER_MODEL` if set.").strip()
    return paths.model_dir(typed or None), bool(typed)


def main() -> None:
    st.set_page_config(page_title="Captioner", page_icon=str(ICON), layout="wide")
    # Visitors see a one-line error, never a stack trace, and no developer menu, wherever this
    # page is started from (.streamlit/config.toml applies only in the repository's root).
    st.set_option("client.showErrorDetails", "none")
    st.set_option("client.toolbarMode", "viewer")
    st.markdown(STYLE, unsafe_allow_html=True)
    st.title(":material/photo_camera: Captioner", anchor=False)
    st.markdown(
        "Drop in photos and read what a neural network sees in them. A frozen ImageNet CNN turns each "
        "photo into one vector; an LSTM, trained on captioned photos, writes the sentence word by word "
        "(*Show and Tell*, Vinyals et al., 2015)."
    )

    st.sidebar.header(":material/tune: Settings", anchor=False)
    model_dir, typed = choose_model()
    model_key = f"{model_dir.absolute()}@{bundle_version(model_dir)}"
    try:
        captioner = load_captioner(str(model_dir), bundle_version(model_dir))
    except (BundleError, EncoderError, OSError) as e:
        show_missing_model(None if typed else e)
        return
    with st.sidebar:
        st.caption(model_summary(captioner))
        options = sidebar_settings(captioner)

    uploads = st.file_uploader("Your photos", accept_multiple_files=True, key="uploads",
                               max_upload_size=MAX_UPLOAD_MB,
                               help=f"JPEG, PNG, WebP, BMP, GIF or TIFF, up to {MAX_UPLOAD_MB} MB and "
                               f"{MAX_PHOTO_PIXELS // 1_000_000} megapixels each; several at once is fine. "
                               "Animated GIFs are captioned by their first frame.")
    photos = chosen_photos(uploads or [])
    if not photos:
        st.info("Add a photo above, or tick an example, to see its caption.", icon=":material/arrow_upward:")
        return
    if len(photos) > MAX_SESSION_PHOTOS:
        st.warning(f"This page captions up to {MAX_SESSION_PHOTOS} photos at a time; the first {MAX_SESSION_PHOTOS} "
                   "are shown. For more, use the command line (`captioner caption FOLDER -o captions.csv`).",
                   icon=":material/photo_library:")
        photos = photos[:MAX_SESSION_PHOTOS]

    results = captions_for(captioner, model_key, photos, options)
    if timing := st.session_state.get("last_timing"):
        count, seconds = timing
        st.sidebar.caption(f"Last run: {count} photo{'s' * (count > 1)} in {seconds:.2f} s "
                           f"({1000 * seconds / count:.0f} ms a photo on {runtime_name(captioner)}, "
                           "feature cache included)")
    failed = sum(not r.ok for r in results)
    summary, csv_column, json_column = st.columns([4, 1, 1], vertical_alignment="center")
    summary.markdown(f"**{len(results) - failed} of {len(results)} photo{'s' * (len(results) > 1)} captioned**"
                     + (f" · {failed} could not be read" if failed else ""))
    csv_column.download_button("CSV", results_csv(results, options.num_results), "captions.csv", "text/csv",
                               on_click="ignore", icon=":material/download:", width="stretch")
    about = {"model": model_dir.name, "settings": options.to_dict()}
    json_column.download_button("JSON", results_json(results, options.num_results, **about), "captions.json",
                                "application/json", on_click="ignore", icon=":material/download:", width="stretch")
    for start in range(0, len(photos), COLUMNS):
        for offset, column in enumerate(st.columns(COLUMNS)):
            i = start + offset
            if i < len(photos):
                with column.container(border=True, key=f"result-{i}"):
                    show_result(photos[i], results[i], options, str(i))


if __name__ == "__main__":  # `streamlit run` executes the page as __main__; tests import the helpers
    main()
