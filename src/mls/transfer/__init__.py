"""Dense transfer protocols: detection and instance segmentation (Mask / Faster R-CNN R-FPN, COCOeval) and
semantic segmentation (FCN, mIoU / mAcc / aAcc), each fine-tuning a pretrained backbone end to end."""
