"""Dense prediction data: the generated scenes benchmark (amas.dense.scenes), semantic segmentation over a VOC-layout
folder (amas.dense.voc), detection over a COCO JSON file (amas.dense.coco), the image helpers they share
(amas.dense.images) and train/val DataLoaders built from a folder (amas.dense.loaders)."""
