# UperNet, SwinV2-T (patch 4, window 8, ImageNet-1k at 256), 160k iterations on ADE20K 512x512: the
# primitive config of the V2 segmentation family. The recipe is the V1 one; V2's continuous position
# bias MLP and logit scales get no weight decay either.
_base_ = '../swin/swin-tiny-patch4-window7-in1k-pre_upernet_8xb2-160k_ade20k-512x512.py'

pretrained = 'https://github.com/SwinTransformer/storage/releases/download/v2.0.0/swinv2_tiny_patch4_window8_256.pth'  # noqa
model = dict(
    backbone=dict(
        type='mmswin.SwinTransformerV2',
        pretrain_img_size=256,
        window_size=8,
        pretrained_window_sizes=[0, 0, 0, 0],
        init_cfg=dict(checkpoint=pretrained)))
optim_wrapper = dict(paramwise_cfg=dict(custom_keys={
    'cpb_mlp': dict(decay_mult=0.0),
    'logit_scale': dict(decay_mult=0.0),
}))
