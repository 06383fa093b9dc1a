"""The item model's wire and disk format: numbers and JSON only, checked before use. A pickle, an
archive with object arrays, wrong shapes or dtypes, NaN: each is refused with a reason, nothing in
it runs, and the model served before goes on serving."""
from __future__ import annotations

import io
import logging
import pickle
import zipfile
from pathlib import Path

import numpy as np
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from models.recommendations import (
    InvalidModel,
    ItemEmbeddings,
    load_latest_model,
    model_from_bytes,
    model_metadata,
    model_to_bytes,
    save_model,
)


class CreatesFileWhenUnpickled:
    """Unpickling this calls ``open(path, "w")``: the marker file proves code ran."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (str(self.path), "w"))


def small_model(version: int = 1, items: int = 5, dims: int = 3) -> ItemEmbeddings:
    rng = np.random.default_rng(version)
    return ItemEmbeddings(
        version=version, fingerprint=f"fp-{version}", fitted_at=1767225600.5, items=[f"sku-{i}" for i in range(items)],
        row_factors=rng.normal(size=(items, dims)).astype(np.float16),
        col_factors=rng.normal(size=(items, dims)).astype(np.float16),
        coverage=rng.uniform(0.0, 1.0, size=items).astype(np.float16), explained_variance=0.75,
    )


def archive(metadata=None, **arrays) -> bytes:
    """An .npz like the worker's, with members replaced or added (``None`` drops a member);
    ``metadata`` is JSON to encode or the member's array itself."""
    model = small_model()
    if not isinstance(metadata, np.ndarray):
        metadata = np.frombuffer(orjson.dumps(model_metadata(model) if metadata is None else metadata), dtype=np.uint8)
    members = {
        "metadata": metadata,
        "row_factors": model.row_factors, "col_factors": model.col_factors, "coverage": model.coverage,
    }
    members.update(arrays)
    buffer = io.BytesIO()
    np.savez(buffer, **{name: value for name, value in members.items() if value is not None})
    return buffer.getvalue()


def metadata(**changes):
    return {**model_metadata(small_model()), **changes}


# --- never runs code -------------------------------------------------------------------------------


def test_a_pickle_is_refused_and_never_run(tmp_path):
    marker = tmp_path / "pwned"
    for protocol in (0, 2, pickle.HIGHEST_PROTOCOL):  # what joblib.load, used before, would run
        with pytest.raises(InvalidModel, match="not an .npz archive"):
            model_from_bytes(pickle.dumps(CreatesFileWhenUnpickled(marker), protocol=protocol))
    assert not marker.exists()


def test_an_archive_with_object_arrays_is_refused_and_never_unpickled(tmp_path):
    marker = tmp_path / "pwned"
    hostile = np.array([CreatesFileWhenUnpickled(marker)], dtype=object)
    for member in ("row_factors", "col_factors", "coverage", "metadata"):
        with pytest.raises(InvalidModel, match=f"{member} must be"):
            model_from_bytes(archive(**{member: hostile}))
    assert not marker.exists()


def test_a_pickle_on_the_topic_is_refused_and_the_previous_model_serves(tmp_path, monkeypatch, caplog):
    import agents.recommendations as recs

    monkeypatch.setattr(recs, "MODEL_DIR", tmp_path / "models")
    holder = recs.ModelHolder()
    holder.receive(b"model", model_to_bytes(small_model(version=3)))
    marker = tmp_path / "pwned"

    with caplog.at_level(logging.ERROR, logger="agents.recommendations"):
        holder.receive(b"model", pickle.dumps(CreatesFileWhenUnpickled(marker)))

    assert not marker.exists()
    assert holder.current.version == 3
    assert "refused a record of recs-models" in caplog.text and "not an .npz archive" in caplog.text
    holder.receive(b"model", model_to_bytes(small_model(version=4)))
    assert holder.current.version == 4


# --- refuses anything else, with a reason ----------------------------------------------------------


@pytest.mark.parametrize("data, reason", [
    (b"", "not an .npz archive"),
    (b"\x93NUMPY", "not an .npz archive"),
    (b"PK\x03\x04 torn", "not a readable model archive"),
    (archive(row_factors=small_model().row_factors.astype(np.float32)), "row_factors must be <f2"),
    (archive(col_factors=small_model().col_factors[:, 0]), "col_factors must be <f2 with 2 dimension"),
    (archive(col_factors=small_model().col_factors[:4]), "factors must both be"),
    (archive(row_factors=np.zeros((5, 0), dtype=np.float16), col_factors=np.zeros((5, 0), dtype=np.float16)), "factors must both be"),
    (archive(row_factors=np.full((5, 3), np.nan, dtype=np.float16)), "NaN"),
    (archive(col_factors=np.full((5, 3), np.inf, dtype=np.float16)), "NaN or infinite"),
    (archive(coverage=np.full(5, 1.5, dtype=np.float16)), "coverage must be 5 values in 0..1"),
    (archive(coverage=np.full(5, np.nan, dtype=np.float16)), "coverage must be"),
    (archive(coverage=np.zeros(4, dtype=np.float16)), "coverage must be"),
    (archive(extra=np.zeros(3)), "archive members must be"),
    (archive(col_factors=None), "archive members must be"),
    (archive(metadata=np.frombuffer(b"\xff{not json", dtype=np.uint8)), "not a readable model archive"),
    (archive(metadata=[1, 2]), "metadata must be an object"),
    (archive(metadata=metadata(extra=1)), "metadata must be an object"),
    (archive(metadata=metadata(format="joblib")), "not streamspine.item-model"),
    (archive(metadata=metadata(version=True)), "version must be"),
    (archive(metadata=metadata(version=0)), "version must be"),
    (archive(metadata=metadata(version="2")), "version must be"),
    (archive(metadata=metadata(fitted_at="now")), "fitted_at must be a finite number"),
    (archive(metadata=metadata(items=["sku-0"] * 5)), "distinct ids"),
    (archive(metadata=metadata(items=["sku-0", "", "a", "b", "c"])), "distinct ids"),
    (archive(metadata=metadata(items=["x" * 257, "a", "b", "c", "d"])), "distinct ids"),
    (archive(metadata=metadata(fingerprint=7)), "fingerprint must be a string"),
])
def test_a_malformed_model_is_refused_with_a_reason(data, reason):
    with pytest.raises(InvalidModel, match=reason):
        model_from_bytes(data)


def test_a_header_that_would_allocate_gigabytes_is_refused_before_reading(tmp_path):
    # A header claiming 10^6 x 10^6 float16 in a member of a few bytes.
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "<f2", "fortran_order": False, "shape": (10**6, 10**6)})
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zipped:
        zipped.writestr("metadata.npy", _npy(np.frombuffer(orjson.dumps(metadata()), dtype=np.uint8)))
        zipped.writestr("row_factors.npy", header.getvalue())
        zipped.writestr("col_factors.npy", _npy(small_model().col_factors))
        zipped.writestr("coverage.npy", _npy(small_model().coverage))
    with pytest.raises(InvalidModel, match="row_factors is too large"):
        model_from_bytes(buffer.getvalue())


def _npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_any_corruption_of_a_model_is_refused_or_still_a_sound_model(data):
    original = bytearray(model_to_bytes(small_model()))
    for _ in range(data.draw(st.integers(1, 8))):
        position = data.draw(st.integers(0, len(original) - 1))
        original[position] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(original)))
    try:
        model = model_from_bytes(bytes(original[:cut] if data.draw(st.booleans()) else original))
    except InvalidModel as error:
        assert str(error)
        return
    assert model.row_factors.shape == model.col_factors.shape == (len(model.items), model.row_factors.shape[1])
    assert np.isfinite(model.row_factors).all() and np.isfinite(model.col_factors).all()


# --- a valid model round-trips ---------------------------------------------------------------------


def test_a_valid_model_round_trips_through_bytes_and_disk(tmp_path):
    model = small_model(version=7, items=40, dims=8)
    for loaded in (model_from_bytes(model_to_bytes(model)), load_latest_model(Path(save_model(model, tmp_path).parent))):
        assert (loaded.version, loaded.fingerprint, loaded.fitted_at, loaded.items, loaded.explained_variance) == (
            7, "fp-7", 1767225600.5, model.items, 0.75)
        assert loaded.row_factors.dtype == np.float16 and np.array_equal(loaded.row_factors, model.row_factors)
        assert np.array_equal(loaded.col_factors, model.col_factors) and np.array_equal(loaded.coverage, model.coverage)
        session = [["sku-1", 1.0, 0.0, 1], ["sku-2", 2.0, 0.0, 2]]
        assert loaded.scores(session) == model.scores(session)


def test_a_refused_file_on_disk_is_skipped_for_the_previous_version(tmp_path, caplog):
    save_model(small_model(version=2), tmp_path)
    (tmp_path / "model-00000003.npz").write_bytes(pickle.dumps(CreatesFileWhenUnpickled(tmp_path / "pwned")))
    with caplog.at_level(logging.WARNING, logger="models.recommendations"):
        assert load_latest_model(tmp_path).version == 2
    assert "model-00000003.npz" in caplog.text and not (tmp_path / "pwned").exists()


def test_the_model_saved_under_data_dir_serves_from_the_worker_start_not_from_the_import(tmp_path, monkeypatch):
    import agents.recommendations as recs

    monkeypatch.setattr(recs, "MODEL_DIR", tmp_path)
    save_model(small_model(version=7), tmp_path)
    holder = recs.ModelHolder()
    assert holder.current is None  # built at import: reads nothing

    holder.load_saved()  # the on_worker_init hook of register()

    assert holder.current is not None and holder.current.version == 7
