# Demo: UperNet with a small Swin V1 trained from scratch on the synthetic shapes of
# tools/demo/make_demo_data.py (ADE20K layout, 128x128, background + 4 shapes): mIoU about 76 on its
# validation split after 2000 iterations of 4 images, about 7 minutes on one CPU core. `make demo`
# (tools/demo/run_demo.py) generates the data and runs it. A delta on the real Swin-T recipe: a small
# backbone without pretrained weights, narrow heads with BN instead of SyncBN, a short schedule with a
# higher AdamW lr (no pretraining), no resizing or cropping, loading in the main process.
_base_ = '../swin/swin-tiny-patch4-window7-in1k-pre_upernet_8xb2-160k_ade20k-512x512.py'

data_root = 'data/demo/ade/ADEChallengeData2016'
# The ADE20K layout and label convention (0 = unlabelled, ignored through reduce_zero_label), with the
# demo's classes: mmseg's ADE20KDataset only accepts subsets of the 150 ADE20K class names, so the
# dataset is its base class with ADE20KDataset's settings.
dataset_type = 'BaseSegDataset'
metainfo = dict(
    classes=('background', 'circle', 'square', 'triangle', 'star'),
    palette=[(90, 90, 90), (220, 20, 60), (0, 130, 230), (250, 170, 30), (120, 60, 200)])
num_classes = 5
crop_size = (128, 128)
batch_size = 4
max_iters = 2000
warmup_iters = 200
norm_cfg = dict(type='BN', requires_grad=True)

model = dict(
    data_preprocessor=dict(size=crop_size),
    backbone=dict(
        embed_dims=32,
        depths=(2, 2, 2, 2),
        num_heads=(1, 2, 4, 8),
        window_size=(8, 8, 8, 4),  # 128x128 input: stages of 32, 16, 8 and 4 pixels
        drop_path_rate=0.0,
        init_cfg=None),
    decode_head=dict(in_channels=[32, 64, 128, 256], channels=64, num_classes=num_classes, norm_cfg=norm_cfg),
    auxiliary_head=dict(in_channels=128, channels=32, num_classes=num_classes, norm_cfg=norm_cfg))

train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations'),  # reduce_zero_label from the dataset
    dict(type='RandomFlip', prob=[0.25, 0.25], direction=['horizontal', 'vertical']),
    dict(type='PackSegInputs'),
]
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations'),  # reduce_zero_label from the dataset
    dict(type='PackSegInputs'),
]
dataset = dict(type=dataset_type, data_root=data_root, metainfo=metainfo, img_suffix='.jpg',
               seg_map_suffix='.png', reduce_zero_label=True)
train_dataloader = dict(
    batch_size=batch_size,
    num_workers=0,
    persistent_workers=False,
    dataset=dict(pipeline=train_pipeline, **dataset))
val_dataloader = dict(
    batch_size=8,
    num_workers=0,
    persistent_workers=False,
    dataset=dict(pipeline=test_pipeline, **dataset))
test_dataloader = val_dataloader

train_cfg = dict(max_iters=max_iters, val_interval=max_iters)
param_scheduler = [
    dict(type='LinearLR', start_factor=0.01, by_epoch=False, begin=0, end=warmup_iters),
    dict(type='PolyLR', power=1.0, eta_min=1e-5, by_epoch=False, begin=warmup_iters, end=max_iters),
]
optim_wrapper = dict(optimizer=dict(lr=2e-3, foreach=True))
auto_scale_lr = dict(base_batch_size=batch_size)

default_hooks = dict(
    logger=dict(interval=25),
    checkpoint=dict(by_epoch=False, interval=max_iters, max_keep_ckpts=1, save_last=True))
log_processor = dict(by_epoch=False, window_size=25)
visualizer = dict(type='SegLocalVisualizer', vis_backends=[dict(type='LocalVisBackend')], name='visualizer')
randomness = dict(seed=0)
