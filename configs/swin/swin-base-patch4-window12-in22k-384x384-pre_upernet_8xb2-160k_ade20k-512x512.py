# Swin-B pre-trained on ImageNet-22k at 384x384 with window 12.
_base_ = './swin-base-patch4-window7-in1k-pre_upernet_8xb2-160k_ade20k-512x512.py'
pretrained = 'https://github.com/SwinTransformer/storage/releases/download/v1.0.0/swin_base_patch4_window12_384_22k.pth'  # noqa
model = dict(backbone=dict(pretrain_img_size=384, window_size=12, init_cfg=dict(checkpoint=pretrained)))
