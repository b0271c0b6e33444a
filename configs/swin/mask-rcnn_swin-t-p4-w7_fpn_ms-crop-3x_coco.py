# 3x schedule (36 epochs, steps at 27 and 33) with the official multi-scale + crop augmentation
# (from DETR): either a random short side in 480..800, or a resize to 400..600, a random crop and
# a resize to 480..800. Drop path 0.2.
_base_ = './mask-rcnn_swin-t-p4-w7_fpn_1x_coco.py'

model = dict(backbone=dict(drop_path_rate=0.2))

short_sides = [480, 512, 544, 576, 608, 640, 672, 704, 736, 768, 800]
train_pipeline = [
    dict(type='LoadImageFromFile', backend_args={{_base_.backend_args}}),
    dict(type='LoadAnnotations', with_bbox=True, with_mask=True),
    dict(type='RandomFlip', prob=0.5),
    dict(
        type='RandomChoice',
        transforms=[
            [dict(type='RandomChoiceResize', scales=[(s, 1333) for s in short_sides], keep_ratio=True)],
            [
                dict(type='RandomChoiceResize', scales=[(400, 1333), (500, 1333), (600, 1333)],
                     keep_ratio=True),
                dict(type='RandomCrop', crop_type='absolute_range', crop_size=(384, 600),
                     allow_negative_crop=True),
                dict(type='RandomChoiceResize', scales=[(s, 1333) for s in short_sides], keep_ratio=True),
            ],
        ]),
    dict(type='PackDetInputs'),
]
train_dataloader = dict(dataset=dict(pipeline=train_pipeline))

max_epochs = 36
train_cfg = dict(max_epochs=max_epochs)
param_scheduler = [
    dict(type='LinearLR', start_factor=0.001, by_epoch=False, begin=0, end=1000),
    dict(type='MultiStepLR', begin=0, end=max_epochs, by_epoch=True, milestones=[27, 33], gamma=0.1),
]
