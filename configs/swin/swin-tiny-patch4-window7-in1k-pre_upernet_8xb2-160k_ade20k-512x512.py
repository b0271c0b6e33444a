# UperNet, Swin-T (patch 4, window 7, ImageNet-1k), 160k iterations of 8x2 512x512 crops on ADE20K:
# the primitive config of the Swin V1 segmentation family. Official recipe: AdamW lr 6e-5, wd 0.01,
# no decay for position tables and norms, 1500 warm-up iterations then poly decay, drop path 0.3.
_base_ = [
    'mmseg::_base_/models/upernet_swin.py',
    'mmseg::_base_/datasets/ade20k.py',
    'mmseg::_base_/default_runtime.py',
    'mmseg::_base_/schedules/schedule_160k.py',
]
custom_imports = dict(imports=['mmswin'], allow_failed_imports=False)
# keeps the random stream in checkpoints so that a resumed run repeats the interrupted one
custom_hooks = [dict(type='mmswin.RNGStateHook')]

crop_size = (512, 512)
pretrained = 'https://github.com/SwinTransformer/storage/releases/download/v1.0.0/swin_tiny_patch4_window7_224.pth'  # noqa
model = dict(
    data_preprocessor=dict(size=crop_size),
    backbone=dict(
        _delete_=True,
        type='mmswin.SwinTransformer',
        arch='tiny',
        pretrain_img_size=224,
        window_size=7,
        drop_path_rate=0.3,
        out_indices=(0, 1, 2, 3),
        init_cfg=dict(type='Pretrained', checkpoint=pretrained)),
    decode_head=dict(in_channels=[96, 192, 384, 768], num_classes=150),
    auxiliary_head=dict(in_channels=384, num_classes=150))

optim_wrapper = dict(
    _delete_=True,
    type='OptimWrapper',
    optimizer=dict(type='AdamW', lr=6e-5, betas=(0.9, 0.999), weight_decay=0.01),
    paramwise_cfg=dict(custom_keys={
        'absolute_pos_embed': dict(decay_mult=0.0),
        'relative_position_bias_table': dict(decay_mult=0.0),
        'norm': dict(decay_mult=0.0),
    }))
param_scheduler = [
    dict(type='LinearLR', start_factor=1e-6, by_epoch=False, begin=0, end=1500),
    dict(type='PolyLR', eta_min=0.0, power=1.0, begin=1500, end=160000, by_epoch=False),
]
train_dataloader = dict(batch_size=2)
val_dataloader = dict(batch_size=1)
test_dataloader = val_dataloader
# 8 GPUs x 2 images; --auto-scale-lr rescales lr to other batch sizes.
auto_scale_lr = dict(enable=False, base_batch_size=16)
