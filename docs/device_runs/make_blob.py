import zipfile, numpy as np
from hybrid_flax import cifar10_folder, input_pipeline
src = '/work/shared/data/cifar10-jpeg.zip'
by = cifar10_folder.scan_source(src)
out = {}
with zipfile.ZipFile(src) as zf:
  for split, items in by.items():
    blobs = [zf.read(n) for n, _ in items]
    out[f'{split}_bytes'] = np.frombuffer(b''.join(blobs), np.uint8)
    out[f'{split}_offsets'] = np.cumsum([0] + [len(b) for b in blobs]).astype(np.int64)
    out[f'{split}_labels'] = np.array([input_pipeline.CIFAR10_CLASSES.index(c) for _, c in items], np.int32)
    print(split, len(items), out[f'{split}_bytes'].nbytes)
np.savez('.gpu/cifar10_jpeg.npz', **out)
