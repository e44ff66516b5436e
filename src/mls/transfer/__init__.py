"""Dense transfer protocols: detection and instance segmentation (Mask / Faster R-CNN, R-FPN or R-C4, COCOeval)
and semantic segmentation (FCN or PSPNet, mIoU / mAcc / aAcc), each fine-tuning a pretrained backbone end to end."""
