"""Install the Python package of a detectron2 sdist whose C++ sources are missing.

pb1-detectron2==0.6 ships detectron2 v0.6's Python files but not `layers/csrc`, so its
setup.py cannot build. This copies the `detectron2/` package into site-packages and writes
a dist-info (with RECORD, so `pip uninstall detectron2` or a later real install replaces it).

Usage: python tools/install_d2_sdist.py pb1-detectron2-0.6.tar.gz [SITE]
(SITE: another folder to install into, e.g. the GPU check's temporary site; default this Python's site-packages)
"""
import base64
import hashlib
import sys
import sysconfig
import tarfile
from pathlib import Path


def main(sdist: str, site: str | None = None) -> None:
    site = Path(site or sysconfig.get_paths()["purelib"])
    records = []
    with tarfile.open(sdist) as tar:
        for member in tar.getmembers():
            parts = Path(member.name).parts
            if len(parts) < 3 or parts[1] != "detectron2" or not member.isfile():
                continue
            rel = Path(*parts[1:])
            data = tar.extractfile(member).read()
            dest = site / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_bytes(data)
            digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
            records.append(f"{rel.as_posix()},sha256={digest},{len(data)}")
    if not records:
        sys.exit(f"install_d2_sdist: no detectron2/ package inside {sdist}; is it pb1-detectron2-0.6.tar.gz?")
    info = site / "detectron2-0.6.dist-info"
    info.mkdir(exist_ok=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: detectron2\nVersion: 0.6\n")
    (info / "INSTALLER").write_text("crossmae-vitdet tools/install_d2_sdist.py\n")
    records += [f"{info.name}/METADATA,,", f"{info.name}/INSTALLER,,", f"{info.name}/RECORD,,"]
    (info / "RECORD").write_text("\n".join(records) + "\n")
    print(f"installed detectron2 0.6 (Python only, {len(records) - 3} files) into {site}")


if __name__ == "__main__":
    if len(sys.argv) not in (2, 3):
        sys.exit("usage: python tools/install_d2_sdist.py PATH/pb1-detectron2-0.6.tar.gz [SITE]")
    main(*sys.argv[1:])
