"""Copy the pickled parts of a megatron torch_dist checkpoint folder (its `.metadata` and each
non-tensor item, byte for byte) into a small folder: a fixture of what one megatron-core version
writes, for tests/robustness/test_untrusted_checkpoints.py (the tensors themselves are left out).

    python tools/checkpoint_pickles.py RUN/iter_0000004 tests/robustness/fixtures/mcore_0.19.2
"""

import argparse
import json
import os
import shutil
import sys


def main(argv=None) -> int:
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    from megatron_moca.safe_load import read_checkpoint_metadata

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", help="an iter_ folder of a torch_dist checkpoint")
    parser.add_argument("output", help="folder to write (.metadata, items/, items.json)")
    args = parser.parse_args(argv)
    os.makedirs(os.path.join(args.output, "items"), exist_ok=True)
    shutil.copyfile(os.path.join(args.checkpoint, ".metadata"), os.path.join(args.output, ".metadata"))
    metadata = read_checkpoint_metadata(os.path.join(args.checkpoint, ".metadata"))
    byte_items = {k for k, v in metadata.state_dict_metadata.items() if isinstance(v, BytesStorageMetadata)}
    names = {}
    for index, info in metadata.storage_data.items():
        if index.fqn not in byte_items:
            continue
        name = f"{len(names):04d}.pt"
        with open(os.path.join(args.checkpoint, info.relative_path), "rb") as f:
            f.seek(info.offset)
            data = f.read(info.length)
        with open(os.path.join(args.output, "items", name), "wb") as f:
            f.write(data)
        names[name] = index.fqn
    with open(os.path.join(args.output, "items.json"), "w") as f:
        json.dump(names, f, indent=1)
    print(f"{args.output}: .metadata and {len(names)} pickled items")
    return 0


if __name__ == "__main__":
    sys.exit(main())
