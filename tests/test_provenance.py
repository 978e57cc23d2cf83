"""File hashes recorded in caches and run folders."""

import hashlib

from mner.provenance import sha256_file


def test_sha256_file_matches_hashlib_across_block_boundaries(tmp_path):
    data = bytes(range(256)) * 5000  # > 1 MiB: more than one read block
    p = tmp_path / "f.bin"
    p.write_bytes(data)
    assert sha256_file(p) == hashlib.sha256(data).hexdigest()
    (tmp_path / "e").write_bytes(b"")
    assert sha256_file(tmp_path / "e") == hashlib.sha256(b"").hexdigest()


def test_mner_version_is_the_package_version():
    import mner
    from mner.provenance import mner_version

    assert mner_version() == mner.__version__ and mner_version().count(".") == 2
