"""``download: true`` through rs-fusion-datasets, without network: its fetch functions mocked at their
boundary over fake caches laid out as it lays them out (tests/data/rsfd_cache.py), or its own download
code run with urllib failing; ``rsfusion datasets`` and ``rsfusion download``."""
from __future__ import annotations

import inspect
import json
import logging
import sys
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from rsfusion.datamodules import downloads
from rsfusion.datamodules.benchmarks import MSPanDataModule, TrentoDataModule
from rsfusion.datamodules.downloads import SOURCES
from rsfusion.datamodules.errors import InputError
from rsfusion.lightning_modules.commands.cli import main
from tests.conftest import CONFIGS, E2E_TRAINER, redirect_outputs
from tests.data.releases import Scene
from tests.data.rsfd_cache import CACHES

PACKAGE = downloads._import_package()


@pytest.fixture
def fetched(monkeypatch):
    """Each fetch function replaced by one that records its data home and leaves the fake cache there,
    printing what the package prints around a download."""
    calls = []

    def fake_for(dataset: str, real):
        def fake(*args, data_home=None, **kwargs):
            calls.append((real.__name__, data_home))
            home = Path(data_home)
            if not downloads.is_cached(SOURCES[dataset], home):
                url = downloads.urls(SOURCES[dataset], real)[0]
                print(f"Downloading {url} to {home / SOURCES[dataset].cache_folder}.zip")
                print("0.000MB/1.000MB", end="\r")
                print("\nDownload Success")
                CACHES[dataset](home)
            return "the arrays, which rsfusion does not use"
        fake.__signature__ = inspect.signature(real)  # the URLs are read from the real defaults
        fake.__name__ = real.__name__
        return fake

    for dataset, source in SOURCES.items():
        monkeypatch.setattr(PACKAGE, source.function, fake_for(dataset, getattr(PACKAGE, source.function)))
    return calls


@pytest.mark.parametrize("dataset", list(SOURCES))
def test_every_benchmark_trains_with_download_true_through_the_console_script(dataset, fetched, tmp_path,
                                                                                monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    config = redirect_outputs(CONFIGS / f"baseline_{dataset.lower()}.yaml", tmp_path / "runs")
    main(["fit", "--config", str(config), "--data.init_args.download", "true", *E2E_TRAINER,
          "--model.init_args.width", "8"])
    home = f"data/{dataset.lower()}"  # the config's root: the download home
    assert fetched == [(SOURCES[dataset].function, home)]
    out = capsys.readouterr().out
    assert "test/OA" in out and f"Downloading {downloads.urls(SOURCES[dataset])[0]}" in out
    card = json.loads(next((tmp_path / "runs").rglob("split_card.json")).read_text())
    folder = tmp_path / home / SOURCES[dataset].cache_folder / SOURCES[dataset].files_folder
    assert card["source"]["function"] == SOURCES[dataset].function
    assert card["source"]["mirrors_used"] == [downloads.urls(SOURCES[dataset])[0]]
    assert all(Path(f["path"].split(".mat:")[0]).resolve().parent == folder.resolve() for f in card["files"])
    assert all(len(f["sha256"]) == 64 for f in card["files"])
    assert list((tmp_path / "runs").rglob("classification_map.tif"))


def test_without_root_the_package_data_home_is_used_and_a_second_run_finds_the_cache(fetched, tmp_path, monkeypatch,
                                                                                       caplog):
    monkeypatch.setenv("SCIKIT_LEARN_DATA", str(tmp_path / "skl"))
    caplog.set_level(logging.INFO)
    first = TrentoDataModule(download=True, patch_size=5)
    again = TrentoDataModule(download=True, patch_size=5)
    assert fetched == [("fetch_trento", str(tmp_path / "skl"))] * 2
    assert first.modalities == again.modalities
    assert first.modalities["hsi"] == str(tmp_path / "skl/trento/Trento-b4afc449ce5d6936ddc04fe267d86f9f35536afd/"
                                                       "Italy_hsi.mat:data")
    messages = [r.getMessage() for r in caplog.records if r.name == downloads.__name__]
    assert messages[0].startswith(f"Trento: downloading with rs-fusion-datasets {downloads.package_version()} "
                                  "(fetch_trento) from https://github.com/tyust-dayu/Trento/archive/")
    assert messages[0].endswith(f"into {tmp_path / 'skl' / 'trento'}") and " MiB in " in messages[1]
    assert messages[2].startswith("Trento: found in the cache")
    # the record of the mirror survives the second (cached) run
    assert again.source["mirrors_used"] == first.source["mirrors_used"]


def test_the_terms_come_before_the_first_download_and_muufl_citations_are_printed(fetched, tmp_path, caplog):
    caplog.set_level(logging.INFO)
    downloads.fetch("Houston2013", tmp_path)
    messages = [r.getMessage() for r in caplog.records if r.name == downloads.__name__]
    assert messages[0].startswith("Houston2013 terms of use:") and "forbid redistributing" in messages[0]
    assert messages[1].startswith("Houston2013: downloading")
    caplog.clear()
    downloads.fetch("MUUFL", tmp_path)
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert "MUUFL: using this dataset requires citing:" in text
    assert "REP-2013-570" in text and "Tech. Rep. 20170417" in text


# ---------------------------------------------------------------------------------------- failures


def test_offline_the_packages_own_download_fails_in_one_line(tmp_path, monkeypatch, capsys):
    """The real fetch function runs; urllib cannot reach any mirror."""
    tried = []

    def offline(url, *args, **kwargs):
        tried.append(url)
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(urllib.request, "urlretrieve", offline)
    monkeypatch.chdir(tmp_path)
    config = redirect_outputs(CONFIGS / "baseline_trento.yaml", tmp_path / "runs")
    with pytest.raises(SystemExit) as exit_:
        main(["fit", "--config", str(config), "--data.init_args.download", "true", "--trainer.max_epochs", "1"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    url = "https://github.com/tyust-dayu/Trento/archive/b4afc449ce5d6936ddc04fe267d86f9f35536afd.zip"
    assert tried == [url]
    assert err[0].startswith("Trento: downloading with rs-fusion-datasets")  # the log said what and where, first
    assert err[-1:] == [f"error: Trento: download failed (ValueError: Failed to download data/trento/trento/trento.zip "
                   f"from all urls); URLs tried: {url}; cache folder: data/trento/trento; to place the files by hand, "
                   "put Italy_hsi.mat, Italy_lidar.mat, allgrd.mat in a folder and give it as root: with download: "
                   "false"]


def test_a_partial_or_corrupt_download_is_never_taken_as_complete(tmp_path, monkeypatch):
    """A download cut short (or a file that is not the release) fails the package's checksum: each later
    call downloads again, and rsfusion never gets a folder."""
    calls = []

    def partial(url, path, *args, **kwargs):
        calls.append(url)
        Path(path).write_bytes(b"PK\x03\x04 half a zip")

    monkeypatch.setattr(urllib.request, "urlretrieve", partial)
    for attempt in (1, 2):
        with pytest.raises(InputError, match=r"^Trento: download failed \(ValueError: Failed to download .*trento\.zip "
                                             r"from all urls\); URLs tried: https://github\.com/"):
            downloads.fetch("Trento", tmp_path)
        assert len(calls) == attempt  # the half file was not accepted: downloaded again
    assert not downloads.is_cached(SOURCES["Trento"], tmp_path)


def test_a_fetch_that_returns_without_the_files_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(PACKAGE, "fetch_berlin_ouc", lambda url=None, data_home=None: None)
    with pytest.raises(InputError, match=r"^Berlin: rs-fusion-datasets returned, but berlin_hsi\.mat, "
                                         r"berlin_sar\.mat, berlin_gt\.mat, berlin_index\.mat is not in "
                                         r".*berlin-ouc/Berlin \(a different package release\?\); delete "
                                         r".*berlin-ouc and fetch again$"):
        downloads.fetch("Berlin", tmp_path)


def test_without_the_package_one_line_says_how_to_install_it(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, downloads.PACKAGE, None)  # as if not installed: importing it fails
    with pytest.raises(InputError, match=r'^Trento: download: true needs rs-fusion-datasets, which is not installed: '
                                         r'pip install "rsfusion\[datasets\]" \(or place the files by hand'):
        TrentoDataModule(download=True)


def test_datasets_the_package_does_not_cover_say_where_to_get_them(tmp_path):
    with pytest.raises(InputError, match=r"^MS/PAN: download: true is not available, rs-fusion-datasets does not cover "
                                         r"this dataset \(Nanjing, Xi'an and Xi'an Urban come from"):
        MSPanDataModule(download=True)
    with pytest.raises(InputError, match=r"^Trento: give root: \(the folder holding the files\) or download: true$"):
        TrentoDataModule()


# ---------------------------------------------------------------------------------------- commands


def test_rsfusion_datasets_prints_the_table_without_the_package(monkeypatch, capsys):
    monkeypatch.setattr(downloads, "package_version", lambda: None)
    monkeypatch.setitem(sys.modules, downloads.PACKAGE, None)
    main(["datasets", "--configs", str(CONFIGS)])
    out = capsys.readouterr().out
    rows = {line.split(" | ")[0].lstrip("| "): line for line in out.splitlines() if line.startswith("| ")}
    assert "| 349 x 1905 | 15 |" in rows["Houston2013"] and "baseline_houston2013, m3amba_houston2013" in rows[
        "Houston2013"]
    assert "P. Gader 2013; X. Du and A. Zare 2017" in rows["MUUFL"] and "| no |" in rows["MUUFL"]
    assert "das2f_nanjing" in rows["Nanjing, Xi'an, Xi'an Urban"]
    assert 'rs-fusion-datasets is not installed: pip install "rsfusion[datasets]" to download' in out


def test_rsfusion_download_fetches_and_prints_where_and_checksums(fetched, tmp_path, capsys):
    main(["download", "muufl", "--root", str(tmp_path)])
    out = capsys.readouterr().out.splitlines()
    folder = tmp_path / "muufl" / "MUUFLGulfport-0.1" / "MUUFLGulfportSceneLabels"
    assert f"MUUFL: {folder}" in out
    line = next(x for x in out if x.strip().startswith("muufl_gulfport_campus_1_hsi_220_label.mat"))
    assert "not a copy rsfusion knows" in line  # the fake file: its checksum is not the release's
    assert out[-1] == f"Use it: --data.init_args.download true --data.init_args.root {tmp_path} (or " \
                      f"--data.init_args.root {folder})"
    with pytest.raises(SystemExit):
        main(["download", "nanjing"])
    assert "unknown dataset 'nanjing': rs-fusion-datasets fetches Houston2013, Trento" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------- readers


def test_houston_roi_exports_and_the_muufl_struct_read_as_the_scene(tmp_path):
    from rsfusion.datamodules.envi_roi import read_roi
    from rsfusion.datamodules.io import read_labels, read_raster

    houston = CACHES["Houston2013"](tmp_path)
    labels, names = read_roi(houston / "2013_IEEE_GRSS_DF_Contest_Samples_TR.txt")
    np.testing.assert_array_equal(labels, Scene("houston2013").train)
    assert names[0] == "grass_healthy" and len(names) == 15
    muufl = CACHES["MUUFL"](tmp_path) / "muufl_gulfport_campus_1_hsi_220_label.mat"
    scene = Scene("muufl")
    np.testing.assert_array_equal(read_labels(f"{muufl}:hsi.sceneLabels.labels", unlabelled=-1)[0], scene.gt)
    assert read_raster(f"{muufl}:hsi.Lidar[0].z").data.shape == (2, *scene.shape)
    assert read_raster(f"{muufl}:hsi.Data").data.shape == (64, *scene.shape)
    from rsfusion.datamodules.errors import RasterError
    with pytest.raises(RasterError, match=r"no hsi\.Lidar\[5\] in the \.mat file \(key 'hsi\.Lidar\[5\]\.z'\)$"):
        read_raster(f"{muufl}:hsi.Lidar[5].z")


def test_bad_roi_exports_fail_in_one_line(tmp_path):
    from rsfusion.datamodules.envi_roi import read_roi
    from rsfusion.datamodules.errors import RasterError
    from tests.data.rsfd_cache import envi_roi_text

    labels = np.zeros((4, 5), np.uint8)
    labels[1, 2], labels[3, 4] = 1, 2
    text = envi_roi_text(labels, ["a", "b"])
    path = tmp_path / "r.txt"
    path.write_text(text.replace("; ROI npts: 1", "; ROI npts: 3", 1))
    with pytest.raises(RasterError, match=r"r\.txt: the header announces 4 points in 2 ROIs, the file lists 2$"):
        read_roi(path)
    path.write_text(text.replace("; File Dimension: 5 x 4", "; File Dimension: 3 x 4"))
    with pytest.raises(RasterError, match=r"r\.txt: 1 points lie outside the 3 x 4 image \(first: X 5, Y 4\)$"):
        read_roi(path)
    path.write_text(text.replace("; File Dimension: 5 x 4\n", ""))
    with pytest.raises(RasterError, match=r"r\.txt: not an ENVI ROI export \(no '; File Dimension"):
        read_roi(path)


@pytest.mark.network
def test_real_download_of_trento(tmp_path):
    """For machines with internet (RSFUSION_NETWORK_TESTS=1): the real Trento mirror, verified by the package."""
    dm = TrentoDataModule(root=str(tmp_path), download=True, patch_size=5)
    assert dm.in_channels == {"hsi": 63, "lidar": 2} and dm.shape == (166, 600) and dm.num_classes == 6
