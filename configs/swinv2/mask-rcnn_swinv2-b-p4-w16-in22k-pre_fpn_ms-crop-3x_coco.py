# SwinV2-B pre-trained on ImageNet-22k with window 12 at 192, fine-tuned on 1k with window 16 at 256
# ("12to16"): window 16 with the pre-training geometry of window 12 (6 in the last stage).
_base_ = './mask-rcnn_swinv2-b-p4-w16_fpn_ms-crop-3x_coco.py'
pretrained = 'https://github.com/SwinTransformer/storage/releases/download/v2.0.0/swinv2_base_patch4_window12to16_192to256_22kto1k_ft.pth'  # noqa
model = dict(backbone=dict(pretrained_window_sizes=[12, 12, 12, 6], init_cfg=dict(checkpoint=pretrained)))
