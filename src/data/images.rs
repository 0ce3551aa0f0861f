//! A folder of images as samples for a single image input: resize of the short side, centre crop,
//! per-channel normalisation, RGB or BGR, NCHW or NHWC.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail, ensure};
use image::imageops::FilterType;

use super::{Sample, Tensor, Values};
use crate::config::{ChannelOrder, ImageConfig, Layout};
use crate::ir::ModelInput;
use crate::onnx::DataType;

const EXTENSIONS: &[&str] = &["png", "jpg", "jpeg", "bmp", "webp", "tif", "tiff"];

/// Image files in `dir` (by extension), sorted by name.
pub(super) fn list(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("cannot list calibration folder {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.is_file()
                && p.extension()
                    .and_then(|e| e.to_str())
                    .is_some_and(|e| EXTENSIONS.contains(&e.to_ascii_lowercase().as_str()))
        })
        .collect();
    ensure!(
        !files.is_empty(),
        "calibration folder {} holds no images ({}), no test_data_set_* folders",
        dir.display(),
        EXTENSIONS.join(", ")
    );
    files.sort();
    Ok(files)
}

/// Preprocessing resolved against the model's single image input.
#[derive(Clone, Debug, PartialEq)]
pub(super) struct Preprocess {
    resize: u32,
    crop: (u32, u32),
    channels: usize,
    layout: Layout,
    config: ImageConfig,
}

impl Preprocess {
    /// Resolves defaults from the input's shape: layout from where the 1 or 3 channels sit, crop from the
    /// spatial size, resize to crop x 256 / 224.
    pub(super) fn for_model(config: &ImageConfig, inputs: &[ModelInput]) -> Result<Preprocess> {
        let [input] = inputs else {
            let names: Vec<&str> = inputs.iter().map(|i| i.name.as_str()).collect();
            bail!(
                "a folder of images feeds single-input models; this model has inputs {}",
                names.join(", ")
            );
        };
        ensure!(
            input.elem_type == DataType::Float as i32,
            "a folder of images feeds a float input; model input '{}' is not FLOAT",
            input.name
        );
        ensure!(
            input.dims.len() == 4,
            "a folder of images feeds a 4-D input; model input '{}' has rank {}",
            input.name,
            input.dims.len()
        );
        let d = &input.dims;
        let is_channels = |x: Option<usize>| matches!(x, Some(1 | 3));
        let layout = match config.layout {
            Some(l) => l,
            None if is_channels(d[1]) => Layout::Nchw,
            None if is_channels(d[3]) => Layout::Nhwc,
            None => bail!(
                "cannot tell the layout of model input '{}' {:?}: pass --layout nchw or nhwc",
                input.name,
                d
            ),
        };
        let (c, h, w) = match layout {
            Layout::Nchw => (d[1], d[2], d[3]),
            Layout::Nhwc => (d[3], d[1], d[2]),
        };
        let channels = c.unwrap_or(3);
        ensure!(
            channels == 1 || channels == 3,
            "model input '{}' has {channels} channels; images give 1 or 3",
            input.name
        );
        let crop = match (config.crop, h, w) {
            (Some(c), _, _) => c,
            (None, Some(h), Some(w)) => (h as u32, w as u32),
            _ => bail!(
                "model input '{}' has a symbolic height or width: pass --crop HxW",
                input.name
            ),
        };
        let resize = config
            .resize
            .unwrap_or_else(|| (crop.0.max(crop.1) as f64 * 256.0 / 224.0).round() as u32);
        ensure!(
            resize >= crop.0.min(crop.1),
            "--resize {resize} is smaller than the crop {}x{}",
            crop.0,
            crop.1
        );
        Ok(Preprocess {
            resize,
            crop,
            channels,
            layout,
            config: config.clone(),
        })
    }

    /// Decodes and preprocesses one image file into a batch-of-one sample.
    pub(super) fn load(&self, path: &Path) -> Result<Sample> {
        let img =
            image::open(path).with_context(|| format!("cannot decode image {}", path.display()))?;
        let (w, h) = (img.width(), img.height());
        ensure!(w > 0 && h > 0, "image {} is empty", path.display());
        let short = w.min(h) as f64;
        let scale = self.resize as f64 / short;
        let (nw, nh) = (
            ((w as f64 * scale).round() as u32).max(self.crop.1),
            ((h as f64 * scale).round() as u32).max(self.crop.0),
        );
        let rgb = img.to_rgb8();
        let resized = image::imageops::resize(&rgb, nw, nh, FilterType::Triangle);
        let (ch, cw) = self.crop;
        let top = ((nh - ch) as f64 / 2.0).round() as u32;
        let left = ((nw - cw) as f64 / 2.0).round() as u32;
        let (ch, cw, c) = (ch as usize, cw as usize, self.channels);
        let mut values = vec![0f32; c * ch * cw];
        for y in 0..ch {
            for x in 0..cw {
                let p = resized.get_pixel(left + x as u32, top + y as u32).0;
                let luma = 0.299 * p[0] as f32 + 0.587 * p[1] as f32 + 0.114 * p[2] as f32;
                let px: [f32; 3] = match (c, self.config.channels) {
                    (1, _) => [luma; 3],
                    (_, ChannelOrder::Rgb) => p.map(f32::from),
                    (_, ChannelOrder::Bgr) => [p[2], p[1], p[0]].map(f32::from),
                };
                for (k, &v) in px.iter().enumerate().take(c) {
                    let v = (v - self.config.mean[k]) / self.config.std[k];
                    let at = match self.layout {
                        Layout::Nchw => (k * ch + y) * cw + x,
                        Layout::Nhwc => (y * cw + x) * c + k,
                    };
                    values[at] = v;
                }
            }
        }
        let dims = match self.layout {
            Layout::Nchw => vec![1, c, ch, cw],
            Layout::Nhwc => vec![1, ch, cw, c],
        };
        Ok(Sample {
            inputs: vec![Tensor {
                dims,
                values: Values::F32(values),
            }],
            origin: path.display().to_string(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn input(dims: [usize; 4]) -> Vec<ModelInput> {
        vec![ModelInput {
            name: "x".into(),
            elem_type: DataType::Float as i32,
            dims: dims.map(Some).to_vec(),
        }]
    }

    /// A 4x2 image whose pixel (x, y) has channels (10x + y, 100 + x, 200 + y).
    fn image(dir: &Path) -> PathBuf {
        let img = image::RgbImage::from_fn(4, 2, |x, y| {
            image::Rgb([(10 * x + y) as u8, 100 + x as u8, 200 + y as u8])
        });
        let path = dir.join("a.png");
        img.save(&path).unwrap();
        path
    }

    #[test]
    fn centre_crop_and_normalisation_nchw() {
        let dir = tempfile::tempdir().unwrap();
        let config = ImageConfig {
            resize: Some(2),
            mean: [1.0, 2.0, 3.0],
            std: [1.0, 2.0, 4.0],
            ..Default::default()
        };
        let prep = Preprocess::for_model(&config, &input([1, 3, 2, 2])).unwrap();
        let s = prep.load(&image(dir.path())).unwrap();
        assert_eq!(s.inputs[0].dims, vec![1, 3, 2, 2]);
        // Columns 1 and 2 of 0..4 are the centre crop.
        let r: Vec<f32> = [10, 20, 11, 21].iter().map(|&v| v as f32 - 1.0).collect();
        let g: Vec<f32> = [101, 102, 101, 102]
            .iter()
            .map(|&v| (v as f32 - 2.0) / 2.0)
            .collect();
        let b: Vec<f32> = [200, 200, 201, 201]
            .iter()
            .map(|&v| (v as f32 - 3.0) / 4.0)
            .collect();
        assert_eq!(s.inputs[0].as_f32().unwrap(), [r, g, b].concat());
    }

    #[test]
    fn nhwc_and_bgr_are_taken_from_the_shape_and_config() {
        let dir = tempfile::tempdir().unwrap();
        let config = ImageConfig {
            resize: Some(2),
            mean: [0.0; 3],
            std: [1.0; 3],
            channels: ChannelOrder::Bgr,
            ..Default::default()
        };
        let prep = Preprocess::for_model(&config, &input([1, 2, 2, 3])).unwrap();
        let s = prep.load(&image(dir.path())).unwrap();
        assert_eq!(s.inputs[0].dims, vec![1, 2, 2, 3]);
        assert_eq!(&s.inputs[0].as_f32().unwrap()[..3], &[200.0, 101.0, 10.0]);
    }

    #[test]
    fn symbolic_spatial_size_needs_a_crop() {
        let inputs = vec![ModelInput {
            name: "x".into(),
            elem_type: 1,
            dims: vec![None, Some(3), None, None],
        }];
        let err = Preprocess::for_model(&ImageConfig::default(), &inputs)
            .unwrap_err()
            .to_string();
        assert!(err.contains("--crop") && err.contains("'x'"), "{err}");
    }
}
