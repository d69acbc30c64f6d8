//! Cheap previews of latents during sampling: a fixed linear map from the 4 latent channels to
//! RGB at latent size (AUTOMATIC1111's "Approx cheap"), no model involved.

use crate::image_io::RgbImage;
use crate::pipeline::Latents;

/// RGB weights of each SD latent channel (rows: channels 0–3; columns: R, G, B), the published
/// coefficients A1111's cheap approximation uses for SD 1.x/2.x latents.
const LATENT_RGB: [[f32; 3]; 4] = [
    [0.298, 0.207, 0.208],
    [0.187, 0.286, 0.173],
    [-0.158, 0.189, 0.264],
    [-0.184, -0.271, -0.473],
];

/// `latents` as an RGB image of the latent's size: each pixel Σ_c latent_c · LATENT_RGB[c], then
/// mapped from [−1, 1] to 8 bits. `None` when the latents are not 4-channel.
pub fn latent_preview(latents: &Latents<'_>) -> Option<RgbImage> {
    let plane = latents.height * latents.width;
    if latents.channels != LATENT_RGB.len() || latents.data.len() != 4 * plane {
        return None;
    }
    let mut pixels = Vec::with_capacity(plane * 3);
    for i in 0..plane {
        let mut rgb = [0f32; 3];
        for (c, weights) in LATENT_RGB.iter().enumerate() {
            let x = latents.data[c * plane + i];
            for (v, w) in rgb.iter_mut().zip(weights) {
                *v += x * w;
            }
        }
        pixels.extend(rgb.map(|v| (((v + 1.0) / 2.0).clamp(0.0, 1.0) * 255.0).round() as u8));
    }
    Some(RgbImage {
        width: latents.width,
        height: latents.height,
        pixels,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_pixel_is_the_channels_weighted_sum() {
        // 1×2 latents: pixel 0 is channel 0 only (1.0), pixel 1 channel 3 only (-1.0).
        let data = [1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, -1.0];
        let latents = Latents {
            data: &data,
            channels: 4,
            height: 1,
            width: 2,
        };
        let image = latent_preview(&latents).unwrap();
        let expect = |v: f32| (((v + 1.0) / 2.0) * 255.0).round() as u8;
        assert_eq!(
            image.pixels,
            vec![
                expect(0.298),
                expect(0.207),
                expect(0.208),
                expect(0.184),
                expect(0.271),
                expect(0.473)
            ]
        );
        let wrong = Latents {
            channels: 3,
            ..latents
        };
        assert!(latent_preview(&wrong).is_none());
    }
}
