#!/usr/bin/env python
"""Download the published baseline UNet checkpoints (EMA weights after 200 epochs).

Source: the Hugging Face repository ottogin/locality-diffusion-baselines, file
``models/baseline_unet/<dataset>/ckpt_epoch_200.pt``; destination:
``<data_root>/models/baseline_unet/<dataset>/ckpt_epoch_200.pt``. Plain urllib, no
huggingface_hub. Existing files are kept unless --force. Each download goes to a temporary
file that is renamed into place only when complete (and, by default, verified to load into the
dataset's UNet). Exit code 1 if anything failed, with what failed where on stderr.

    python scripts/download_baselines.py --datasets mnist cifar10
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_BASE_URL = "https://huggingface.co/ottogin/locality-diffusion-baselines/resolve/main"
DATASETS = ("mnist", "fashion_mnist", "cifar10", "celeba_hq", "afhq")
RELATIVE = "models/baseline_unet/{dataset}/ckpt_epoch_200.pt"
CHUNK = 1 << 20


def checkpoint_path(data_root: Path, dataset: str) -> Path:
    """Where the checkpoint of ``dataset`` lives under ``data_root``."""
    return Path(data_root) / RELATIVE.format(dataset=dataset)


def checkpoint_url(base_url: str, dataset: str) -> str:
    return f"{base_url.rstrip('/')}/{RELATIVE.format(dataset=dataset)}"


def download(url: str, dest: Path, timeout: float, progress: bool = True) -> None:
    """Stream ``url`` to ``dest`` through a temp file in the same folder + os.replace."""
    from tqdm.auto import tqdm

    dest.parent.mkdir(parents=True, exist_ok=True)
    request = urllib.request.Request(url, headers={"User-Agent": "locality-download-baselines/0.1"})
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(request, timeout=timeout) as resp:
            total = int(resp.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024,
                      desc=dest.parent.name, disable=not progress) as bar:
                while chunk := resp.read(CHUNK):
                    out.write(chunk)
                    bar.update(len(chunk))
            if total is not None and out.tell() != total:
                raise OSError(f"incomplete download: got {out.tell()} of {total} bytes")
        os.replace(tmp, dest)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def verify(path: Path, dataset: str) -> None:
    """Load the file into the dataset's UNet (strict); raises on any mismatch."""
    if str(PROJECT_ROOT) not in sys.path:
        sys.path.insert(0, str(PROJECT_ROOT))
    from locality.unet.checkpoint import load_unet_checkpoint

    load_unet_checkpoint(path, dataset=dataset)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-root", type=Path, default=PROJECT_ROOT / "data",
                   help="root of the data folder (default: %(default)s)")
    p.add_argument("--datasets", nargs="+", choices=DATASETS, default=list(DATASETS),
                   help="which checkpoints to fetch (default: all)")
    p.add_argument("--base-url", default=DEFAULT_BASE_URL,
                   help="URL prefix the relative checkpoint paths are appended to (default: %(default)s)")
    p.add_argument("--force", action="store_true", help="download even if the file already exists")
    p.add_argument("--timeout", type=float, default=60.0, help="socket timeout in seconds (default: %(default)s)")
    p.add_argument("--no-verify", dest="verify", action="store_false",
                   help="skip loading each downloaded file into its UNet")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    failures: list[str] = []
    for dataset in dict.fromkeys(args.datasets):  # de-duplicated, order kept
        dest = checkpoint_path(args.data_root, dataset)
        url = checkpoint_url(args.base_url, dataset)
        if dest.exists() and not args.force:
            print(f"[{dataset}] already present: {dest} (use --force to re-download)")
            continue
        print(f"[{dataset}] {url}\n    -> {dest}")
        try:
            download(url, dest, timeout=args.timeout, progress=args.progress)
        except urllib.error.HTTPError as e:
            failures.append(f"[{dataset}] download failed: {url} (to {dest}): HTTP {e.code} {e.reason}")
            continue
        except urllib.error.URLError as e:
            failures.append(f"[{dataset}] download failed: {url} (to {dest}): {e.reason}")
            continue
        except OSError as e:  # timeouts, disk full, permission denied, truncated body
            failures.append(f"[{dataset}] download failed: {url} (to {dest}): {type(e).__name__}: {e}")
            continue
        if args.verify:
            try:
                verify(dest, dataset)
            except Exception as e:  # noqa: BLE001 - report any verification failure, keep going
                bad = dest.with_name(dest.name + ".invalid")
                os.replace(dest, bad)
                failures.append(f"[{dataset}] {url} downloaded but does not load as the {dataset} UNet "
                                f"(moved to {bad}): {e}")
                continue
        print(f"[{dataset}] ok")
    if failures:
        print("\n".join(["error: some checkpoints could not be fetched:", *failures]), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
