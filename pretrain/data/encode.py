"""Documents -> token ids, streamed in bounded batches, in one process or `workers` processes.

The result is the same for any number of workers: batches are cut from the document stream
the same way, encoded independently, and handed back in submission order. At most
2 x workers batches (each at most BATCH_DOCS documents or BATCH_BYTES of text, or one larger
document) are in flight, so memory does not grow with the corpus.
"""
from __future__ import annotations

import multiprocessing
import os
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

import numpy as np
from tokenizers import Tokenizer

from pretrain.data.corpus import Document

BATCH_DOCS = 256
BATCH_BYTES = 1 << 20


@dataclass(frozen=True)
class Encoder:
    """How a document becomes ids: [bos] + tokenizer ids + [eos] (eos only if the tokenizer's
    post-processor did not append it, bos only if configured and not already first)."""
    tokenizer_json: str
    eos_id: int
    bos_id: int | None = None
    add_special_tokens: bool = True

    def tokenizer(self) -> Tokenizer:
        return Tokenizer.from_str(self.tokenizer_json)

    def encode(self, tokenizer: Tokenizer, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """(all ids concatenated as uint32, per-document lengths)."""
        encodings = tokenizer.encode_batch(texts, add_special_tokens=self.add_special_tokens)
        parts, lengths = [], np.empty(len(texts), dtype=np.int64)
        for i, enc in enumerate(encodings):
            ids = enc.ids
            if self.bos_id is not None and (not ids or ids[0] != self.bos_id):
                ids = [self.bos_id] + ids
            if not ids or ids[-1] != self.eos_id:
                ids = ids + [self.eos_id]
            parts.append(np.asarray(ids, dtype=np.uint32))
            lengths[i] = len(ids)
        flat = np.concatenate(parts) if parts else np.empty(0, dtype=np.uint32)
        return flat, lengths


def document_batches(docs: Iterable[Document], max_docs: int = BATCH_DOCS,
                     max_bytes: int = BATCH_BYTES) -> Iterator[list[Document]]:
    """Consecutive runs of documents, each cut at `max_docs` documents or `max_bytes` of text."""
    batch, size = [], 0
    for doc in docs:
        batch.append(doc)
        size += len(doc.text)
        if len(batch) >= max_docs or size >= max_bytes:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


# -- worker processes ---------------------------------------------------------------------------

_WORKER: tuple[Encoder, Tokenizer] | None = None


def _worker_init(encoder: Encoder, threads: int) -> None:
    global _WORKER
    os.environ["RAYON_NUM_THREADS"] = str(threads)  # read when the tokenizer's thread pool starts
    _WORKER = (encoder, encoder.tokenizer())


def _worker_encode(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    encoder, tokenizer = _WORKER
    return encoder.encode(tokenizer, texts)


def encode_documents(batches: Iterable[list[Document]], encoder: Encoder, workers: int = 1
                     ) -> Iterator[tuple[list[Document], np.ndarray, np.ndarray]]:
    """(documents, their ids concatenated, per-document lengths) for every batch, in order."""
    if workers < 1:
        raise ValueError(f"--workers={workers} must be >= 1")
    if workers == 1:
        tokenizer = encoder.tokenizer()
        for docs in batches:
            yield (docs, *encoder.encode(tokenizer, [d.text for d in docs]))
        return
    threads = max(1, (os.cpu_count() or 1) // workers)
    # spawn: the parent may already run the tokenizer's threads, which do not survive a fork
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                             initializer=_worker_init, initargs=(encoder, threads)) as pool:
        pending: deque = deque()
        try:
            for docs in batches:
                pending.append((docs, pool.submit(_worker_encode, [d.text for d in docs])))
                if len(pending) >= 2 * workers:
                    done, future = pending.popleft()
                    yield (done, *future.result())
            while pending:
                done, future = pending.popleft()
                yield (done, *future.result())
        finally:
            for _, future in pending:
                future.cancel()
