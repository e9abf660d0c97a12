"""stars_fast.safe_pickle.restricted_load: payloads never run, real formats load (CIFAR batches written
by Python 2 style protocol 2, NAYER-style tensors written with plain pickle.dump)."""
import io
import os
import pickle

import numpy as np
import pytest
import torch

from stars_fast.safe_pickle import restricted_load


class _RunsCommand:
    """Unpickling this with plain pickle.load runs `touch <path>`."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return os.system, (f"touch {self.path}",)


class _CallsOpen:
    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


def _payloads(marker):
    yield f"{os.system.__module__}.system", pickle.dumps({"data": _RunsCommand(marker)}, protocol=2)
    yield "io.open", pickle.dumps([_CallsOpen(marker)], protocol=4)
    # hand-written: builtins.exec with a string (no class needed to build it)
    source = f"open({str(marker)!r}, 'w').close()"
    yield "builtins.exec", b"cbuiltins\nexec\n(" + pickle.dumps(source, protocol=0)[:-1] + b"tR."


def test_plain_pickle_would_run_the_payload(tmp_path):
    """The payload really is one: pickle.load runs it (so the refusals below mean something)."""
    marker = tmp_path / "ran"
    pickle.loads(pickle.dumps(_RunsCommand(marker)))
    assert marker.exists()


@pytest.mark.parametrize("tensors", [False, True])
def test_payloads_are_refused_and_never_run(tmp_path, tensors):
    marker = tmp_path / "ran"
    for refused, payload in _payloads(marker):
        path = tmp_path / "evil.pkl"
        path.write_bytes(payload)
        with pytest.raises(pickle.UnpicklingError, match=refused.replace(".", r"\.")):
            restricted_load(str(path), tensors=tensors)
        assert not marker.exists(), f"{refused} ran"


class _ForgedStorage:
    """Pickles as a torch storage (torch.storage._load_from_bytes) whose bytes are a payload, not torch.save."""

    def __init__(self, payload: bytes):
        self.payload = payload

    def __reduce__(self):
        return torch.storage._load_from_bytes, (self.payload,)


def test_payload_inside_a_tensor_storage_is_refused(tmp_path):
    """The storage bytes of a pickled tensor go to torch.load(weights_only=True), not to plain pickle
    (torch's own _load_from_bytes uses weights_only=False, which would run this payload)."""
    marker = tmp_path / "ran"
    forged = pickle.dumps(_ForgedStorage(pickle.dumps(_RunsCommand(marker), protocol=2)), protocol=4)
    with pytest.raises(pickle.UnpicklingError):
        restricted_load(io.BytesIO(forged), tensors=True)
    assert not marker.exists()


def test_tensors_need_tensors_true():
    blob = pickle.dumps(torch.ones(2))
    with pytest.raises(pickle.UnpicklingError, match="torch._utils._rebuild_tensor_v2"):
        restricted_load(io.BytesIO(blob))


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_nayer_style_tensor_file_loads(tmp_path, protocol):
    """NAYER keeps label embeddings as tensors written with pickle.dump: values, dtype, views, Parameters."""
    embeddings = torch.randn(10, 6, dtype=torch.float64)
    obj = {"emb": embeddings, "view": embeddings[2:, ::2], "ids": torch.arange(4), "param": torch.nn.Parameter(
        torch.ones(3)), "names": ["airplane", "car"]}
    path = tmp_path / "label_emb.pickle"
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=protocol)
    loaded = restricted_load(str(path), tensors=True)
    assert torch.equal(loaded["emb"], embeddings) and loaded["emb"].dtype == torch.float64
    assert torch.equal(loaded["view"], embeddings[2:, ::2])
    assert torch.equal(loaded["ids"], torch.arange(4)) and loaded["ids"].dtype == torch.int64
    assert isinstance(loaded["param"], torch.nn.Parameter) and loaded["param"].requires_grad
    assert loaded["names"] == ["airplane", "car"]


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_cifar_style_batch_loads(protocol):
    rng = np.random.default_rng(0)
    batch = {"batch_label": "testing batch 1 of 1", "labels": [3, 1], "data": rng.integers(0, 256, (2, 3072),
             dtype=np.uint8), "filenames": ["a.png", "b.png"], "scalar": np.float32(0.5), "set": {1, 2},
             "raw": b"\x00\xff", "empty": b"", "complex": 1 + 2j}
    loaded = restricted_load(io.BytesIO(pickle.dumps(batch, protocol=protocol)))
    assert np.array_equal(loaded["data"], batch["data"]) and loaded["data"].dtype == np.uint8
    assert {k: v for k, v in loaded.items() if k != "data"} == {k: v for k, v in batch.items() if k != "data"}


def test_python2_cifar_batch_loads():
    """The real CIFAR files were written by Python 2: GLOBAL 'numpy.core.multiarray _reconstruct' and
    str payloads that latin1 maps to bytes. Hand-written opcode stream of such a file (2 images of 1 byte)."""
    data = np.array([[7], [250]], dtype=np.uint8)
    py2 = (b"\x80\x02}q\x01(U\x06labelsq\x02]q\x03(K\x01K\x00eU\x04dataq\x04"
           b"cnumpy.core.multiarray\n_reconstruct\nq\x05cnumpy\nndarray\nq\x06K\x00\x85U\x01b\x87Rq\x07"
           b"(K\x01K\x02K\x01\x86cnumpy\ndtype\nq\x08U\x02u1K\x00K\x01\x87Rq\t(K\x03U\x01|NNNJ\xff\xff\xff\xff"
           b"J\xff\xff\xff\xffK\x00tb\x89U\x02\x07\xfatbu.")
    loaded = restricted_load(io.BytesIO(py2))
    assert loaded["labels"] == [1, 0]
    assert np.array_equal(loaded["data"], data)


@pytest.mark.parametrize("blob", [b"", b"garbage", b"\x80\x04\x95", pickle.dumps([1, 2])[:-3]])
def test_garbage_is_an_unpickling_error(blob):
    with pytest.raises(pickle.UnpicklingError):
        restricted_load(io.BytesIO(blob))


def test_only_latin1_codec_is_admitted():
    blob = b"c_codecs\nencode\n(X\x03\x00\x00\x00abcX\x05\x00\x00\x00rot13tR."
    with pytest.raises(pickle.UnpicklingError, match="rot13"):
        restricted_load(io.BytesIO(blob))
