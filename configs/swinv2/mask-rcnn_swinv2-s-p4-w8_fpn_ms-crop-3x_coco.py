_base_ = './mask-rcnn_swinv2-t-p4-w8_fpn_ms-crop-3x_coco.py'
pretrained = 'https://github.com/SwinTransformer/storage/releases/download/v2.0.0/swinv2_small_patch4_window8_256.pth'  # noqa
model = dict(backbone=dict(arch='small', init_cfg=dict(checkpoint=pretrained)))
