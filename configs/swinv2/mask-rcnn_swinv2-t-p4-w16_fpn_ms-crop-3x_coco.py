# SwinV2-T pre-trained with window 16 at 256x256 (its last stage, 8x8, ran with one 8x8 window), used
# with window 16: pretrained_window_sizes keeps the position geometry the checkpoint learned.
_base_ = './mask-rcnn_swinv2-t-p4-w8_fpn_ms-crop-3x_coco.py'
pretrained = 'https://github.com/SwinTransformer/storage/releases/download/v2.0.0/swinv2_tiny_patch4_window16_256.pth'  # noqa
model = dict(
    backbone=dict(window_size=16, pretrained_window_sizes=[16, 16, 16, 8], init_cfg=dict(checkpoint=pretrained)))
