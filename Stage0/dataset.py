"""Image-caption pairs for contrastive fine-tuning (seed 000's ImageTextContrastiveDataset)."""
from __future__ import annotations

import logging

import torch
from torch.utils.data import Dataset

from data_check import load_item
from data_rows import csv_columns, read_rows
from image_cache import load_cached, open_cache

logger = logging.getLogger("siglip_med")


# Column names when none are given: the JSON layout of seed 000, the CSV layout of seed 003.
DEFAULT_KEYS = {"json": ("image", "caption"), "csv": ("img_path", "impression")}


def data_keys(path, image_key=None, caption_key=None) -> tuple[str, str]:
    """(image column, text column): as given, else the seeds' defaults. A CSV's text column is
    `impression` (seed 003) or, if it has none, `findings` (seed 002)."""
    kind = "csv" if str(path).lower().endswith(".csv") else "json"
    if kind == "csv" and caption_key is None:
        header = csv_columns(path)
        caption_key = next((c for c in ("impression", "findings") if c in header), "impression")
    return image_key or DEFAULT_KEYS[kind][0], caption_key or DEFAULT_KEYS[kind][1]


def read_pairs(path, image_root, image_key=None, caption_key=None, split_column=None, split=None,
               problems=None) -> list[dict]:
    image_key, caption_key = data_keys(path, image_key, caption_key)
    rows = read_rows(path, image_root, (image_key, caption_key), image_key=image_key,
                     split_column=split_column, split=split, problems=problems)
    return [{**r, "caption": str(r[caption_key]).strip()} for r in rows]


class ImageTextContrastiveDataset(Dataset):
    """Returns pixel_values, input_ids, attention_mask and the caption's index among the
    distinct captions (`caption_id`), which lets a frozen text tower embed each caption once.

    Captions are tokenized once here, padded to `max_length` as SigLIP was trained (its text
    tower pools the last position, so the padding length is part of the model).

    `collect_bad_rows`: leave bad rows out into `bad_rows` (for data_check.check_datasets to
    report or drop) instead of raising at the first one.
    """

    def __init__(self, json_path, image_root, image_processor, tokenizer, max_length: int,
                 image_key=None, caption_key=None, split_column=None, split=None, tokenize=None,
                 label_column=None, class_names=None, collect_bad_rows: bool = False):
        self.json_path = str(json_path)
        self.bad_rows = [] if collect_bad_rows else None
        self.rows = read_pairs(json_path, image_root, image_key, caption_key, split_column, split, self.bad_rows)
        self.label_hot = None
        if label_column:  # multi-hot class labels per row (the label-aware losses' positives)
            index = {c: k for k, c in enumerate(class_names)}
            self.label_hot = torch.zeros(len(self.rows), len(class_names))
            for i, r in enumerate(self.rows):
                for c in str(r.get(label_column) or "").split(";"):
                    if c.strip():
                        self.label_hot[i, index[c.strip()]] = 1
        self.image_processor = image_processor
        self.image_cache = open_cache(json_path, image_processor, self.rows, image_root=image_root,
                                      image_key=data_keys(json_path, image_key, caption_key)[0])
        self.captions = list(dict.fromkeys(r["caption"] for r in self.rows))
        index = {c: i for i, c in enumerate(self.captions)}
        self.caption_ids = torch.tensor([index[r["caption"]] for r in self.rows], dtype=torch.long)
        if not self.captions:
            # Every row was bad: data_check says so in one line. A tokenizer given no text
            # raised IndexError from its own internals instead.
            self.input_ids = self.attention_mask = torch.zeros((0, max_length), dtype=torch.long)
            return
        full = tokenizer(self.captions, truncation=False, verbose=False)["input_ids"]
        n_long = sum(len(ids) > max_length for ids in full)
        if n_long:
            logger.warning("%s: %d of %d distinct captions exceed the model's %d text tokens and are "
                           "truncated", json_path, n_long, len(self.captions), max_length)
        if tokenize is not None:  # the text tower's own convention (e.g. LLM2Vec's left padding)
            self.input_ids, self.attention_mask = tokenize(self.captions, max_length)
        else:
            tok = tokenizer(self.captions, padding="max_length", truncation=True, max_length=max_length,
                            return_tensors="pt")
            self.input_ids = tok["input_ids"]
            self.attention_mask = tok.get("attention_mask", torch.ones_like(self.input_ids))

    def __len__(self):
        return len(self.rows)

    def drop_rows(self, indices) -> None:
        """Leave rows out (bad data under --on_bad_sample skip); captions no row uses any more go too."""
        drop = set(indices)
        keep = [k for k in range(len(self.rows)) if k not in drop]
        self.rows = [self.rows[k] for k in keep]
        used = sorted(set(self.caption_ids[keep].tolist()))
        new_id = {old: new for new, old in enumerate(used)}
        self.captions = [self.captions[c] for c in used]
        self.input_ids, self.attention_mask = self.input_ids[used], self.attention_mask[used]
        self.caption_ids = torch.tensor([new_id[c] for c in self.caption_ids[keep].tolist()], dtype=torch.long)
        if self.label_hot is not None:
            self.label_hot = self.label_hot[keep]

    def __getitem__(self, i):
        return load_item(self, i, self._item)

    def _item(self, i):
        r = self.rows[i]
        image = load_cached(r["image_path"], row=r["row"], source=self.json_path, cache=self.image_cache,
                            processor=self.image_processor)
        pixel_values = self.image_processor(images=image, return_tensors="pt")["pixel_values"][0]
        c = int(self.caption_ids[i])
        item = {"pixel_values": pixel_values, "input_ids": self.input_ids[c],
                "attention_mask": self.attention_mask[c], "caption_id": c, "index": i}
        if self.label_hot is not None:
            item["labels"] = self.label_hot[i]
        return item


def collate_fn(batch):
    out = {k: torch.stack([b[k] for b in batch]) for k in ("pixel_values", "input_ids", "attention_mask")}
    out["caption_id"] = torch.tensor([b["caption_id"] for b in batch])
    out["index"] = torch.tensor([b["index"] for b in batch])
    if "labels" in batch[0]:
        out["labels"] = torch.stack([b["labels"] for b in batch])
    return out
