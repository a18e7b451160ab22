"""Report-generation metrics that run a model: BERTScore (the bert-score package), CheXbert F1
(the CheXbert labeller on a local chexbert.pth) and RadGraph F1 (the radgraph package on a local
copy of its model archive). The text-overlap metrics are metrics.report_metrics.

Each scorer is built once, before a model generates (a wrong path fails in a second, not after
the generation), and called as scorer(predictions, references) -> (values, implementation):
the implementation names the package, its version and the settings that change the number.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import shutil
import sys
import tempfile
import warnings
from importlib.metadata import version
from pathlib import Path

import numpy as np
import torch

from cli import UserError


def _brief(error, limit: int = 200) -> str:
    """A library's message on one line (hub errors span several), cut short."""
    return " ".join(str(error).split())[:limit]


def _file_sha256(path, chars: int = 12) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()[:chars]


# ---------------------------------------------------------------- BERTScore

class BertScore:
    """Mean BERTScore precision, recall and F1 of the (prediction, reference) pairs, from
    bert-score (Zhang et al. 2020) with the model, layer, idf and baseline rescaling named.

    model None means bert-score's model for English (roberta-large, layer 17) taken from the
    Hugging Face cache only: an evaluation never starts a 1.4 GB download nobody asked for, nor
    waits on a hub it cannot reach. A model named explicitly (a hub id or a local folder) loads
    as from_pretrained loads it. A model that does not load makes the metric unavailable, with
    the reason, instead of ending an evaluation whose other metrics are computed."""

    name = "BERTScore"
    keys = ("BERTScore-P", "BERTScore-R", "BERTScore-F1")

    def __init__(self, model: str | None = None, num_layers: int | None = None, idf: bool = False,
                 rescale_with_baseline: bool = False, device: str = "cpu", batch_size: int = 64):
        self.scorer, self.idf, self.batch_size = None, idf, batch_size
        try:
            self.implementation = self._load(model, num_layers, rescale_with_baseline, device)
        except Exception as e:  # any failure to load is reported, not raised (see the class doc)
            self.implementation = "unavailable: " + _brief(e, 400)

    def _load(self, model, num_layers, rescale, device) -> str:
        try:
            import bert_score
            from bert_score.utils import lang2model, model2layers
        except ImportError as e:
            raise RuntimeError(f"the bert-score package is not installed (pip install bert-score): {e}") from e
        from transformers import AutoConfig
        name = model or lang2model["en"]
        local = Path(os.path.expanduser(name))
        if local.is_dir():
            source, known = str(local), local.name  # a local copy of e.g. roberta-large keeps its folder name
        elif name.startswith(("/", ".", "~")) or name.count("/") > 1:  # a path, not a hub id
            raise FileNotFoundError(f"--bertscore_model {name}: no such folder")
        elif model is None:
            from huggingface_hub import snapshot_download
            try:
                source = snapshot_download(name, local_files_only=True)
            except Exception as e:
                raise RuntimeError(f"{name} (bert-score's model for English) is not in the Hugging Face cache; pass "
                                   f"--bertscore_model {name} to download it, or --bertscore_model FOLDER") from e
            known = name
        else:
            source = known = name
        total = AutoConfig.from_pretrained(source).num_hidden_layers
        if num_layers is not None:
            layer_note = f"layer {num_layers} of {total}"
            if not 0 < num_layers <= total:
                raise ValueError(f"--bertscore_num_layers {num_layers}: {name} has layers 1..{total}")
        elif known in model2layers:
            num_layers = model2layers[known]
            layer_note = f"layer {num_layers} of {total} (bert-score's tuned layer)"
        else:
            num_layers = total
            layer_note = f"layer {num_layers} of {total} (the last: bert-score has no tuned layer for it)"
        baseline = Path(bert_score.__file__).parent / "rescale_baseline" / "en" / f"{known}.tsv"
        if rescale and not baseline.is_file():
            raise RuntimeError(f"bert-score has no rescaling baseline for {known}; drop "
                               "--bertscore_rescale_with_baseline or use a model it has one for (e.g. roberta-large)")
        self.scorer = bert_score.BERTScorer(model_type=source, num_layers=num_layers, idf=self.idf, device=device,
                                            lang="en", rescale_with_baseline=rescale,
                                            baseline_path=str(baseline) if rescale else None,
                                            batch_size=self.batch_size)
        return (f"bert-score {version('bert-score')}: {name}, {layer_note}, "
                f"idf {'on (weights from the references)' if self.idf else 'off'}, "
                f"baseline rescaling {'on' if rescale else 'off'}")

    def __call__(self, predictions: list[str], references: list[str]) -> tuple[dict, str]:
        if self.scorer is None or not predictions:
            return dict.fromkeys(self.keys), self.implementation
        if self.idf:
            self.scorer.compute_idf(references)  # as bert_score.score(idf=True) does
        p, r, f = self.scorer.score(predictions, references, batch_size=self.batch_size)
        return {k: float(v.mean()) for k, v in zip(self.keys, (p, r, f))}, self.implementation


# ---------------------------------------------------------------- CheXbert F1

# The labeller's head order and classes, from CheXbert's src/constants.py (Smit et al. 2020).
CHEXBERT_LABELS = ["Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Opacity", "Lung Lesion", "Edema",
                   "Consolidation", "Pneumonia", "Atelectasis", "Pneumothorax", "Pleural Effusion", "Pleural Other",
                   "Fracture", "Support Devices", "No Finding"]
BLANK, POSITIVE, NEGATIVE, UNCERTAIN = 0, 1, 2, 3  # "No Finding" has two classes: blank, positive
# The five findings report-generation papers give CheXbert F1 on (Miura et al. 2021, MedGemma).
CHEXBERT_TOP5 = ["Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Pleural Effusion"]


def chexbert_f1(reference_classes, predicted_classes) -> dict:
    """Micro and macro F1 over the 14 CheXbert labels and over the five findings, plus each label's
    F1, from the labeller's classes [reports, 14] of references and predictions. A label counts
    as present when positive or uncertain, as f1chexbert and RadEval score report generation
    (their "rrg" mode); blank and negative count as absent. scikit-learn's f1_score, with 0 for a
    label that neither side has (its zero_division=0, as classification_report gives)."""
    from sklearn.metrics import f1_score
    ref = np.isin(np.asarray(reference_classes), (POSITIVE, UNCERTAIN)).astype(int)
    hyp = np.isin(np.asarray(predicted_classes), (POSITIVE, UNCERTAIN)).astype(int)
    top5 = [CHEXBERT_LABELS.index(n) for n in CHEXBERT_TOP5]
    out = {}
    for tag, cols in (("14", slice(None)), ("5", top5)):
        for avg in ("micro", "macro"):
            out[f"CheXbert-F1-{avg}-{tag}"] = float(f1_score(ref[:, cols], hyp[:, cols], average=avg,
                                                             zero_division=0))
    per_label = f1_score(ref, hyp, average=None, zero_division=0)
    out["CheXbert-F1-per-label"] = {n: float(v) for n, v in zip(CHEXBERT_LABELS, per_label)}
    return out


class CheXbert:
    """The CheXbert labeller (bert-base-uncased + 13 four-class heads + a two-class "No Finding"
    head on the [CLS] state) loaded from the public chexbert.pth, and its F1 (`chexbert_f1`).

    Written here with transformers' BertModel because no package loads a local checkpoint offline:
    f1chexbert (0.0.2) and RadEval (2.2.1) download chexbert.pth and bert-base-uncased from the hub
    by fixed names, and f1chexbert's tokenisation calls encode_plus, which transformers 5 removed.
    The tokenisation is CheXbert's (src/bert_tokenizer.py): whitespace collapsed, [CLS] text [SEP],
    cut at 512 tokens."""

    name = "CheXbert"

    def __init__(self, checkpoint, tokenizer: str = "bert-base-uncased", device: str = "cpu", batch_size: int = 32):
        from transformers import AutoTokenizer
        self.device, self.batch_size = device, batch_size
        self.bert, self.heads, config = _load_chexbert(checkpoint)
        self.bert.to(device).eval()
        self.heads.to(device).eval()
        try:
            if tokenizer.startswith(("/", ".", "~")) and not Path(tokenizer).expanduser().is_dir():
                raise OSError("no such folder")
            self.tokenizer = AutoTokenizer.from_pretrained(os.path.expanduser(tokenizer))
        except (OSError, ValueError) as e:
            raise UserError(f"--chexbert_tokenizer {tokenizer}: no tokenizer loads from it ({_brief(e)}"
                            "); CheXbert reads bert-base-uncased's: pass a local folder holding its vocab.txt or "
                            "tokenizer.json, or run where the hub is reachable") from e
        if len(self.tokenizer) > config.vocab_size:
            raise UserError(f"--chexbert_tokenizer {tokenizer}: {len(self.tokenizer)} tokens, more than the "
                            f"checkpoint's {config.vocab_size}; CheXbert reads bert-base-uncased's tokenizer")
        from transformers import __version__ as tf_version
        from sklearn import __version__ as sk_version
        digest = _file_sha256(Path(checkpoint).expanduser())
        self.implementation = (f"CheXbert labeller ({Path(checkpoint).name}, sha256 {digest}...) on transformers "
                               f"{tf_version}, tokenizer {tokenizer}; positive or uncertain = present; "
                               f"scikit-learn {sk_version} f1_score")

    @torch.no_grad()
    def classes(self, reports: list[str]) -> np.ndarray:
        """The labeller's class (0 blank, 1 positive, 2 negative, 3 uncertain) per report and label."""
        out = []
        for i in range(0, len(reports), self.batch_size):
            texts = [" ".join(r.split()) for r in reports[i:i + self.batch_size]]
            enc = self.tokenizer(texts, truncation=True, max_length=512, padding=True, return_tensors="pt")
            enc = enc.to(self.device)
            cls = self.bert(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).last_hidden_state[:, 0]
            out.append(torch.stack([head(cls).argmax(-1) for head in self.heads], dim=1).cpu())
        return torch.cat(out).numpy() if out else np.zeros((0, len(CHEXBERT_LABELS)), dtype=np.int64)

    def __call__(self, predictions: list[str], references: list[str]) -> tuple[dict, str]:
        if not predictions:
            return {}, self.implementation
        return chexbert_f1(self.classes(references), self.classes(predictions)), self.implementation


def _load_chexbert(path):
    """(BertModel, heads, BertConfig) from CheXbert's checkpoint: {"model_state_dict": ...} with
    `module.bert.*` and `module.linear_heads.{0..13}.*` (saved from nn.DataParallel). The config
    is read off the tensors' shapes; the heads are hidden/64, as in every BERT Google released
    (bert-base-uncased: 768/64 = 12)."""
    from transformers import BertConfig, BertModel
    where = f"--chexbert_path {path}"
    try:
        ckpt = torch.load(Path(path).expanduser(), map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(f"{where}: not readable as a PyTorch checkpoint ({_brief(e)}); "
                        "pass CheXbert's chexbert.pth") from e
    state = ckpt.get("model_state_dict") if isinstance(ckpt, dict) else None
    if not isinstance(state, dict):
        raise UserError(f"{where}: no 'model_state_dict' in it; pass CheXbert's chexbert.pth")
    state = {k.removeprefix("module."): v for k, v in state.items()}
    bert = {k.removeprefix("bert."): v for k, v in state.items() if k.startswith("bert.")}
    want = {f"linear_heads.{i}.{p}" for i in range(len(CHEXBERT_LABELS)) for p in ("weight", "bias")}
    emb = bert.get("embeddings.word_embeddings.weight")
    if want - state.keys() or emb is None:
        missing = sorted(want - state.keys()) + ([] if emb is not None else ["bert.embeddings.word_embeddings.weight"])
        raise UserError(f"{where}: not a CheXbert checkpoint: lacks {', '.join(missing[:4])}"
                        f"{' ...' if len(missing) > 4 else ''} (keys module.bert.* and module.linear_heads.0..13.*)")
    vocab, hidden = emb.shape
    try:
        layers = 1 + max((int(k.split(".")[2]) for k in bert if k.startswith("encoder.layer.")), default=-1)
        config = BertConfig(vocab_size=vocab, hidden_size=hidden, num_attention_heads=max(1, hidden // 64),
                            num_hidden_layers=layers,
                            intermediate_size=bert["encoder.layer.0.intermediate.dense.weight"].shape[0],
                            max_position_embeddings=bert["embeddings.position_embeddings.weight"].shape[0],
                            type_vocab_size=bert["embeddings.token_type_embeddings.weight"].shape[0])
    except (KeyError, ValueError) as e:
        raise UserError(f"{where}: its BERT lacks {e} (keys module.bert.embeddings.*, "
                        "module.bert.encoder.layer.N.*); pass CheXbert's chexbert.pth") from e
    model = BertModel(config, add_pooling_layer="pooler.dense.weight" in bert)
    bert.pop("embeddings.position_ids", None)  # a buffer older transformers saved; rebuilt here
    try:
        missing, unexpected = model.load_state_dict(bert, strict=False)
    except RuntimeError as e:  # a tensor of another shape
        raise UserError(f"{where}: its BERT does not load: {_brief(e)}") from e
    heads = torch.nn.ModuleList([torch.nn.Linear(hidden, 2 if i == len(CHEXBERT_LABELS) - 1 else 4)
                                 for i in range(len(CHEXBERT_LABELS))])
    head_state = {k.removeprefix("linear_heads."): v for k, v in state.items() if k.startswith("linear_heads.")}
    try:
        heads.load_state_dict(head_state)
    except RuntimeError as e:
        raise UserError(f"{where}: its heads do not fit CheXbert's 13 four-class heads and a two-class 'No Finding' "
                        f"head: {_brief(e)}") from e
    if missing or unexpected:
        raise UserError(f"{where}: its BERT does not load: missing {missing[:3]}, unexpected {unexpected[:3]}")
    return model, heads, config


# ---------------------------------------------------------------- RadGraph F1

RADGRAPH_MODEL_TYPES = ("radgraph", "radgraph-xl")
# F1RadGraph's reward levels; its own README scores with "all", the three at once.
RADGRAPH_REWARD_LEVELS = ("simple", "partial", "complete", "all")
_RADGRAPH_LEVELS = ("simple", "partial", "complete")
# Where a DyGIE++ archive's config.json names the BERT it embeds and tokenizes with.
_RADGRAPH_BERT_FIELDS = (("model", "embedder", "token_embedders", "bert", "model_name"),
                         ("dataset_reader", "token_indexers", "bert", "model_name"))


def _radgraph_tokenizer_shim():
    """Let radgraph 0.1.18's vendored AllenNLP tokenise under transformers 5, which removed the two
    tokenizer methods it calls: `encode_plus` (now the tokenizer's __call__, same arguments) and
    `build_inputs_with_special_tokens` (the indexer re-adds [CLS]/[SEP] around each 512-piece
    segment). Every tokenizer radgraph loads comes from cached_transformers.get_tokenizer, so that
    function is wrapped to give each new instance the two methods; the installed package is not
    edited, and a tokenizer that still has them (transformers 4) is left alone."""
    from radgraph.allennlp.common import cached_transformers
    if getattr(cached_transformers.get_tokenizer, "project_shim", False):
        return
    original = cached_transformers.get_tokenizer

    @functools.wraps(original)
    def get_tokenizer(model_name, **kwargs):
        tokenizer = original(model_name, **kwargs)
        if not hasattr(tokenizer, "encode_plus"):
            tokenizer.encode_plus = tokenizer.__call__
        if not hasattr(tokenizer, "build_inputs_with_special_tokens"):
            start, end = _special_tokens_around(tokenizer)
            tokenizer.build_inputs_with_special_tokens = lambda ids, pair=None: (
                start + list(ids) + end if pair is None else _no_pairs())
        return tokenizer

    get_tokenizer.project_shim = True
    cached_transformers.get_tokenizer = get_tokenizer


def _special_tokens_around(tokenizer) -> tuple[list[int], list[int]]:
    """The ids a tokenizer puts before and after one sequence ([CLS] and [SEP] for BERT), read off
    its own output as AllenNLP reads them (pretrained_transformer_tokenizer's reverse engineering)."""
    full = tokenizer("a")["input_ids"]
    bare = tokenizer("a", add_special_tokens=False)["input_ids"]
    for i in range(len(full) - len(bare) + 1):
        if full[i:i + len(bare)] == bare:
            return full[:i], full[i + len(bare):]
    raise ValueError(f"cannot tell {type(tokenizer).__name__}'s special tokens from its output {full}")


def _no_pairs():
    raise NotImplementedError("radgraph's indexer builds single sequences only")


class RadGraphF1:
    """RadGraph F1 (Delbrouck et al. 2022) from the radgraph package's own F1RadGraph, on a local
    copy of its model archive (StanfordAIMI/RRG_scorers radgraph.tar.gz or radgraph-xl.tar.gz,
    extracted: config.json, vocabulary/, weights.th). Nothing downloads: radgraph fetches the
    archive only into an empty folder, and the BERT its config.json names (a hub id) is read from
    a local folder (`bert`) or the Hugging Face cache; only its config and tokenizer are read, the
    weights are weights.th's. transformers 5 needs `_radgraph_tokenizer_shim`.

    The reward levels are F1RadGraph's: simple (entities: tokens and label), partial (entities and
    whether they have a relation), complete (entities with each relation). "all" reports the three
    (RG_E, RG_ER, RG_bar_ER; RG_ER is the one report-generation papers usually give). The archive
    is read through a temporary copy of its config.json that names the local BERT; vocabulary/ is
    copied too (AllenNLP writes a lock file in it), weights.th is linked."""

    name = "RadGraph"

    def __init__(self, path, model_type: str = "radgraph-xl", reward_level: str = "all", bert: str | None = None,
                 device: str = "cpu"):
        if model_type not in RADGRAPH_MODEL_TYPES:
            raise UserError(f"--radgraph_model_type {model_type}: one of {', '.join(RADGRAPH_MODEL_TYPES)}")
        if reward_level not in RADGRAPH_REWARD_LEVELS:
            raise UserError(f"--radgraph_reward_level {reward_level}: one of {', '.join(RADGRAPH_REWARD_LEVELS)}")
        self.reward_level = reward_level
        levels = _RADGRAPH_LEVELS if reward_level == "all" else (reward_level,)
        self.keys = tuple(f"RadGraph-F1-{level}" for level in levels)
        archive = _radgraph_archive(path, model_type)
        config = json.loads((archive / "config.json").read_text())
        names = [_radgraph_bert_name(config, fields, archive) for fields in _RADGRAPH_BERT_FIELDS]
        local = {name: _radgraph_bert_folder(name, bert, archive) for name in names}
        for fields, name in zip(_RADGRAPH_BERT_FIELDS, names):
            functools.reduce(dict.__getitem__, fields[:-1], config)[fields[-1]] = str(local[name])
        try:
            with warnings.catch_warnings():  # radgraph's import resets the DeprecationWarning filter for everyone
                from radgraph import F1RadGraph
        except ImportError as e:
            raise UserError(f"--radgraph_path: the radgraph package is not installed (pip install radgraph==0.1.18): "
                            f"{_brief(e)}") from e
        _radgraph_tokenizer_shim()
        dev = torch.device(device)
        with tempfile.TemporaryDirectory(prefix="radgraph-") as tmp:
            folder = Path(tmp) / model_type
            folder.mkdir()
            (folder / "config.json").write_text(json.dumps(config))
            shutil.copytree(archive / "vocabulary", folder / "vocabulary")
            (folder / "weights.th").symlink_to((archive / "weights.th").resolve())
            try:
                with contextlib.redirect_stdout(sys.stderr):  # its "Using device" line, not in the table
                    self.scorer = F1RadGraph(reward_level=reward_level, model_type=model_type, model_cache_dir=tmp,
                                             cuda=(dev.index or 0) if dev.type == "cuda" else -1)
            except Exception as e:  # a tokenizer, a BERT config or weights.th that does not fit
                raise UserError(f"--radgraph_path {path}: the {model_type} model does not load from {archive} "
                                f"({type(e).__name__}: {_brief(e)}); it takes the folder "
                                f"{model_type}.tar.gz unpacks to, with the BERT its config.json names") from e
        from transformers import __version__ as tf_version
        bert_note = ", ".join(f"{n}" + (f" from {local[n]}" if str(local[n]) != n else "") for n in sorted(local))
        self.implementation = (f"radgraph {version('radgraph')} F1RadGraph, reward level {reward_level}; "
                               f"{model_type} from {archive} (weights.th sha256 {_file_sha256(archive / 'weights.th')}"
                               f"...), BERT {bert_note}; transformers {tf_version} through clinical_metrics' "
                               "tokenizer shim")

    def __call__(self, predictions: list[str], references: list[str]) -> tuple[dict, str]:
        if not predictions:
            return dict.fromkeys(self.keys), self.implementation
        with torch.no_grad(), contextlib.redirect_stdout(sys.stderr):
            mean_reward, *_ = self.scorer(refs=list(references), hyps=list(predictions))
        values = mean_reward if self.reward_level == "all" else (mean_reward,)
        return {k: float(v) for k, v in zip(self.keys, values)}, self.implementation


def _radgraph_archive(path, model_type: str) -> Path:
    """The folder holding config.json, vocabulary/ and weights.th: PATH itself (an extracted
    archive) or PATH/MODEL_TYPE (radgraph's own cache folder)."""
    where, root = f"--radgraph_path {path}", Path(path).expanduser()
    if not root.is_dir():
        raise UserError(f"{where}: no such folder; pass the folder {model_type}.tar.gz (StanfordAIMI/RRG_scorers) "
                        "unpacks to")
    archive = root / model_type if not (root / "config.json").is_file() and (root / model_type).is_dir() else root
    for name, kind in (("config.json", "file"), ("vocabulary", "folder"), ("weights.th", "file")):
        if not (archive / name).exists():
            raise UserError(f"{where}: no {archive / name} ({kind}); pass the folder {model_type}.tar.gz "
                            "(StanfordAIMI/RRG_scorers) unpacks to: config.json, vocabulary/, weights.th")
    # radgraph names the label namespaces after the model type: another type's archive finds no labels
    labels = archive / "vocabulary" / f"{model_type}__ner_labels.txt"
    if not labels.is_file():
        other = sorted(f.name.removesuffix("__ner_labels.txt") for f in labels.parent.glob("*__ner_labels.txt"))
        raise UserError(f"{where}: no {labels}: the archive is not {model_type}'s"
                        + (f"; pass --radgraph_model_type {other[0]}" if other else ""))
    return archive


def _radgraph_bert_name(config: dict, fields: tuple, archive: Path) -> str:
    try:
        name = functools.reduce(dict.__getitem__, fields, config)
    except (KeyError, TypeError):
        name = None
    if not isinstance(name, str):
        raise UserError(f"--radgraph_path: {archive / 'config.json'} has no {'.'.join(fields)}; "
                        "not a RadGraph (DyGIE++) model archive")
    return name


def _radgraph_bert_folder(name: str, bert: str | None, archive: Path) -> Path:
    """A local folder for the BERT config.json names: --radgraph_bert, else the name itself when it
    is a folder, else its copy in the Hugging Face cache (never a download)."""
    if bert is not None:
        folder = Path(bert).expanduser()
        if not (folder / "config.json").is_file():
            raise UserError(f"--radgraph_bert {bert}: no config.json in it; pass a folder holding {name}'s "
                            "config.json and tokenizer files")
        return folder
    if Path(name).expanduser().is_dir():
        return Path(name).expanduser()
    from huggingface_hub import snapshot_download
    try:
        return Path(snapshot_download(name, local_files_only=True))
    except Exception as e:
        raise UserError(f"--radgraph_path: {archive / 'config.json'} names the BERT {name}, which is not in the "
                        f"Hugging Face cache (nothing is downloaded); pass --radgraph_bert FOLDER holding its "
                        "config.json and tokenizer files") from e
